"""HexGen baseline: heterogeneity-aware asymmetric parallel groups, no prefill/decode split.

Models: HexGen's scheduler searches how to partition a heterogeneous cluster into serving groups with
asymmetric tensor/pipeline layouts (stages may differ in TP degree and GPU type) while accounting for the
network between the GPUs it groups. That is ThunderServe's own two-level search restricted to colocated
groups (`SchedulerConfig.phases=(COLOCATED,)`): the same tabu grouping, layout DP and routing LP, so the
baseline gets an equally strong search. KV compression is irrelevant (no KV ever moves between groups).
Replicas run the simulator's colocated (chunked-prefill) scheduling.
Leaves out: HexGen's genetic-algorithm search itself (replaced by a search at least as strong here),
prefill/decode disaggregation (by definition), and its runtime's specific kernels.
"""

from __future__ import annotations

from thunderserve.costmodel.comm import Compression
from thunderserve.plan import Phase, Plan
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

HEXGEN_TIME_LIMIT_S = 10.0  # the same budget ThunderServe's planner gets by default


def plan_hexgen(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec, *,
                time_limit_s: float = HEXGEN_TIME_LIMIT_S, seed: int = 0) -> Plan:
    """Colocated-only heterogeneity-aware plan (see module docstring)."""
    from thunderserve.scheduler import SchedulerConfig, plan_deployment

    config = SchedulerConfig(time_limit_s=time_limit_s, seed=seed, phases=(Phase.COLOCATED,),
                             kv_compression=Compression.NONE)
    result = plan_deployment(cluster, model, workload, slo, config=config)
    estimate = dict(result.plan.estimate)
    estimate.update({"system": "hexgen", "planner_max_rate_rps": result.max_rate_at_slo})
    return result.plan.model_copy(update={"estimate": estimate})
