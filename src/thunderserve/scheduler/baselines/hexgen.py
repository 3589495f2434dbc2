"""HexGen baseline as published: heterogeneous asymmetric TP/PP groups, colocated, one request per call.

Models: HexGen (ICML'24) partitions a heterogeneous cluster into serving groups whose pipeline stages may
differ in TP degree and GPU type, accounting for the network between the GPUs it groups; every group serves
prefill and decode of its requests (no disaggregation, so KV never moves and compression does not apply). Its
runtime serves one request per call: a group runs one request's prefill and decode to the end before the next
(no continuous batching); the comparison simulates that with `max_batch_size=1` (`report.systems`).
The grouping search is ThunderServe's own restricted to colocated groups (`SchedulerConfig.phases`), with the
same budget and seed as every searching system; with `--verify-top` its candidates are re-scored under its own
one-request runtime. Requests go to the group with the fewest outstanding requests.
Leaves out: HexGen's genetic-algorithm search itself (replaced by one at least as strong here; its objective
does not know the runtime does not batch, except through verification) and its runtime's kernels.
`thunderserve-colocated` is the same search with our continuous-batching runtime: an ablation of ours.
"""

from __future__ import annotations

from thunderserve.costmodel.comm import Compression
from thunderserve.plan import Phase, Plan
from thunderserve.scheduler.config import DEFAULT_MAX_EVALUATIONS
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec


def plan_hexgen(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec, *,
                budget: int = DEFAULT_MAX_EVALUATIONS, seed: int = 0) -> Plan:
    """Colocated-only heterogeneity-aware plan (see module docstring; no verification here)."""
    from thunderserve.scheduler import SchedulerConfig, plan_deployment

    config = SchedulerConfig(max_evaluations=budget, seed=seed, phases=(Phase.COLOCATED,),
                             kv_compression=Compression.NONE)
    result = plan_deployment(cluster, model, workload, slo, config=config)
    estimate = dict(result.plan.estimate)
    estimate.update({"system": "hexgen", "planner_max_rate_rps": result.max_rate_at_slo,
                     "runtime": "one request per call"})
    return result.plan.model_copy(update={"estimate": estimate})
