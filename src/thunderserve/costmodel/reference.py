"""The reference latency that SLO scales multiply (documented in the README, section "SLO").

Reference = the cost model's unloaded latency of one request of the workload's mean prompt length, served
alone by A100-80GB GPUs on NVLink with the smallest tensor-parallel degree that holds the model:
    TTFT_ref = prefill of the mean prompt
    TPOT_ref = one decode step at batch 1 with context = mean prompt + half the mean output
A scale of 5 (the default) gives every system room for batching and queueing, as in DistServe's and
ThunderServe's evaluations, which set SLOs at a few times the single-request latency.

TPOT has a published anchor where the workload is one of DistServe's applications (its evaluation, Table 1):
chatbot 100 ms for OPT-13B and OPT-66B, 200 ms for OPT-175B; code completion 200 ms; summarisation 150 ms
(OPT-66B). `published_tpot_ms` maps a workload to its application by name (conversation/chat -> chatbot,
coding/code -> code completion, summari[sz]ation -> summarisation) and a model to the anchors by parameter
count: the chatbot target is 100 ms up to 66B parameters, 200 ms from 175B, log-linear in between; the other
two applications have one anchor each, used for every size. With an anchor, the default SLO (scale 5) is
(5 x TTFT_ref, the published TPOT) and a scale s multiplies both by s / 5, so sweeps keep their meaning;
without one (a trace of unknown kind), TPOT stays s x TPOT_ref.
"""

from __future__ import annotations

import math

from thunderserve.costmodel.perf import group_perf
from thunderserve.errors import InfeasibleError
from thunderserve.spec.cluster import ClusterSpec, NodeSpec, resolve_cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import DEFAULT_ATTAINMENT, DEFAULT_SLO_SCALE, SloSpec
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


# DistServe's evaluation (OSDI'24, Table 1): TPOT targets per application, (model parameters in billions, ms)
PUBLISHED_TPOT_MS: dict[str, tuple[tuple[float, float], ...]] = {
    "chatbot": ((13.0, 100.0), (66.0, 100.0), (175.0, 200.0)),
    "code_completion": ((66.0, 200.0),),
    "summarisation": ((66.0, 150.0),),
}
APPLICATION_OF_WORKLOAD = (("conversation", "chatbot"), ("chat", "chatbot"), ("coding", "code_completion"),
                           ("code", "code_completion"), ("summari", "summarisation"))


def application_of(workload_name: str) -> str | None:
    """DistServe's application a workload stands for, by name (None: no published anchor)."""
    name = workload_name.lower()
    return next((app for key, app in APPLICATION_OF_WORKLOAD if key in name), None)


def published_tpot_ms(model: ModelSpec, workload_name: str) -> float | None:
    """DistServe's published TPOT target for this application and model size (see the module docstring)."""
    app = application_of(workload_name)
    if app is None:
        return None
    anchors = PUBLISHED_TPOT_MS[app]
    size_b = model.num_params / 1e9
    if size_b <= anchors[0][0]:
        return anchors[0][1]
    for (s0, t0), (s1, t1) in zip(anchors, anchors[1:], strict=False):
        if size_b <= s1:
            w = math.log(size_b / s0) / math.log(s1 / s0)
            return t0 + w * (t1 - t0)
    return anchors[-1][1]


def slo_from_scale(model: ModelSpec, workload: WorkloadSpec, scale: float,
                   attainment_target: float = DEFAULT_ATTAINMENT) -> SloSpec:
    """TTFT = scale x TTFT_ref; TPOT = the published target x scale / DEFAULT_SLO_SCALE where the workload has
    one, else scale x TPOT_ref (see the module docstring)."""
    ttft, tpot = reference_latency_s(model, workload.mean_prompt_tokens, workload.mean_output_tokens)
    published = published_tpot_ms(model, workload.name)
    tpot_ms = tpot * scale * 1e3 if published is None else published * scale / DEFAULT_SLO_SCALE
    return SloSpec(ttft_ms=ttft * scale * 1e3, tpot_ms=tpot_ms, attainment_target=attainment_target, scale=scale)
