"""The reference latency that SLO scales multiply (documented in the README, section "SLO").

Reference = the cost model's unloaded latency of one request of the workload's mean prompt length, served
alone by A100-80GB GPUs on NVLink with the smallest tensor-parallel degree that holds the model:
    TTFT_ref = prefill of the mean prompt
    TPOT_ref = one decode step at batch 1 with context = mean prompt + half the mean output
A scale of 5 (the default) gives every system room for batching and queueing, as in DistServe's and
ThunderServe's evaluations, which set SLOs at a few times the single-request latency.
"""

from __future__ import annotations

from thunderserve.costmodel.perf import group_perf
from thunderserve.errors import InfeasibleError
from thunderserve.spec.cluster import ClusterSpec, NodeSpec, resolve_cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import DEFAULT_ATTAINMENT, SloSpec
from thunderserve.spec.workload import WorkloadSpec

REFERENCE_GPU = "A100-80GB"


def reference_latency_s(model: ModelSpec, mean_prompt_tokens: float, mean_output_tokens: float
                        ) -> tuple[float, float]:
    """(TTFT_ref, TPOT_ref) in seconds."""
    for tp in (1, 2, 4, 8, 16):
        cluster = resolve_cluster(ClusterSpec(name="reference", nodes=(NodeSpec(name="ref", gpu=REFERENCE_GPU,
                                                                                 count=tp),)))
        perf = group_perf(model, [(cluster.gpus, model.num_layers)], cluster)
        if perf.kv_capacity_tokens >= mean_prompt_tokens + mean_output_tokens:
            p = mean_prompt_tokens
            ttft = perf.prefill_time_s(p, p * p)
            tpot = perf.decode_time_s(1, p + mean_output_tokens / 2)
            return ttft, tpot
    raise InfeasibleError(f"model {model.name} does not fit on 16 {REFERENCE_GPU} (reference latency)")


def slo_from_scale(model: ModelSpec, workload: WorkloadSpec, scale: float,
                   attainment_target: float = DEFAULT_ATTAINMENT) -> SloSpec:
    """SLO targets = scale x reference latency of this model on this workload's mean request."""
    ttft, tpot = reference_latency_s(model, workload.mean_prompt_tokens, workload.mean_output_tokens)
    return SloSpec(ttft_ms=ttft * scale * 1e3, tpot_ms=tpot * scale * 1e3, attainment_target=attainment_target,
                   scale=scale)
