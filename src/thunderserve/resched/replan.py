"""Re-planning after an event: the lightweight path (keep groups and layouts, re-decide phases and routing)
and the full two-level search, each with its decision time and the cost of applying it.

Lightweight path (ThunderServe's answer to failures and workload shifts, in seconds):
  1. keep every group whose GPUs all survive, with its parallel layout (no weights reloaded);
  2. a group that lost GPUs is re-laid over its remaining GPUs when they can hold the model (a reload), else
     dropped; GPUs added by an event form new groups the same way (a load);
  3. the lower level alone (`scheduler.orchestrate.lightweight_phases`: a multi-start descent over phase flips
     and prefill+decode pair flips within a fixed budget of routing-LP solves) re-decides each group's phase
     and the routing LP is re-solved for the (new) workload estimate. A phase flip costs no weight reload,
     only in-flight work: decode <-> colocated hands the running batch over in seconds, but a flip into
     prefill drains every running sequence first, so such flips must gain more than `DRAIN_MARGIN`.
Full path: `scheduler.plan_deployment` on the surviving cluster, applied by restarting every group.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from thunderserve.costmodel.comm import Compression
from thunderserve.errors import PlanError
from thunderserve.plan import Group, Phase, Plan, group_perf_of
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

WEIGHT_LOAD_BYTES_S = 2.0e9  # per GPU, host/NVMe to device; GPUs of a group load in parallel
PROCESS_START_S = 15.0  # start a worker process, init CUDA and the communicators
FLIP_DRAIN_S = 2.0  # typical wait for in-flight work on a flipped worker (handed over / drained)
# A flip into prefill from a serving role waits for every running sequence to finish (tens of seconds to
# minutes of decoding, the group serving nothing meanwhile). Unless the best assignment without such flips
# falls short of the observed rate, one with them must beat it by this much (relative LP rate): more than
# the estimate's own error against the simulator (~5%).
DRAIN_MARGIN = 0.10


@dataclass(frozen=True)
class Change:
    """One step of applying a new plan, with what it costs."""

    kind: str  # flip | drop | relayout | add | routing | restart
    group: str | None
    detail: str
    reloads_weights: bool
    apply_time_s: float


@dataclass(frozen=True)
class ReplanResult:
    plan: Plan
    decision_time_s: float
    max_rate_at_slo: float
    changes: tuple[Change, ...]

    @property
    def apply_time_s(self) -> float:
        """Changes are applied in parallel across groups; the slowest sets the pace."""
        return max((c.apply_time_s for c in self.changes), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.to_dict(), "decision_time_s": self.decision_time_s,
                "max_rate_at_slo": self.max_rate_at_slo, "apply_time_s": self.apply_time_s,
                "reloads_weights": any(c.reloads_weights for c in self.changes),
                "changes": [asdict(c) for c in self.changes]}


def load_time_s(group: Group, model: ModelSpec, cluster: Cluster) -> float:
    """Time to (re)load a group's weights: its fullest GPU's shard at WEIGHT_LOAD_BYTES_S, plus start-up."""
    perf = group_perf_of(group, model, cluster)
    per_gpu = max(s.weight_bytes / s.tp for s in perf.stages)
    return PROCESS_START_S + per_gpu / WEIGHT_LOAD_BYTES_S


def _same_layout(a: Group, b: Group) -> bool:
    return a.stages == b.stages


def diff_plans(old: Plan, new: Plan, model: ModelSpec, cluster: Cluster) -> list[Change]:
    """What applying `new` over `old` takes, group by group (matched by identical layout)."""
    changes: list[Change] = []
    old_by_layout = {g.stages: g for g in old.groups}
    new_layouts = {g.stages for g in new.groups}
    for g in old.groups:
        if g.stages not in new_layouts:
            changes.append(Change("drop", g.id, f"stop group {g.id} ({len(g.gpus)} GPUs)", False, 0.0))
    for g in new.groups:
        prev = old_by_layout.get(g.stages)
        if prev is None:
            kept = set(g.gpus) & set(old.gpus)
            kind = "relayout" if kept else "add"
            changes.append(Change(kind, g.id, f"load {model.name} on {len(g.gpus)} GPUs as {g.phase.value}",
                                  True, load_time_s(g, model, cluster)))
        elif prev.phase != g.phase:
            changes.append(Change("flip", g.id, f"{prev.phase.value} -> {g.phase.value}", False, FLIP_DRAIN_S))
    if old.routing != new.routing:
        changes.append(Change("routing", None, "new routing shares for new requests", False, 0.0))
    return changes


def lightweight_replan(plan: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                       *, added_gpus: frozenset[str] = frozenset(), rate_rps: float | None = None,
                       clock: Callable[[], float] = time.perf_counter) -> ReplanResult:
    """Keep surviving groups and layouts; re-lay or drop damaged ones; re-decide phases and routing.

    `cluster` is the cluster after the event; `added_gpus` are GPUs the event brought (they form new groups).
    GPUs the running plan left idle stay idle: the lightweight path does not re-group. `rate_rps`, the
    observed request rate when known: flips into prefill (a drain) are avoided while the drain-free choice
    serves it (`orchestrate.lightweight_phases`).
    """
    from thunderserve.scheduler.api import orchestrate
    from thunderserve.scheduler.context import PlanningContext
    from thunderserve.scheduler.layout import best_group_layout
    from thunderserve.scheduler.orchestrate import lightweight_phases

    start = clock()
    alive = {g.id for g in cluster.gpus}
    used: set[str] = set()
    groups: list[Group] = []
    for g in plan.groups:
        if set(g.gpus) <= alive:
            groups.append(g)
            used |= set(g.gpus)
            continue
        remaining = [x for x in g.gpus if x in alive]
        stages = best_group_layout(remaining, cluster, model) if remaining else None
        if stages is not None:
            groups.append(Group(id=g.id, phase=g.phase, stages=stages))
            used |= set(remaining)
    spare = [g.id for g in cluster.gpus if g.id in added_gpus and g.id not in used]
    groups.extend(_groups_from_new_gpus(spare, cluster, model, {g.id for g in groups}))
    if not groups:
        raise PlanError("groups: no groups to orchestrate")
    ctx = PlanningContext(cluster, model, workload, slo, Compression(plan.kv_transfer.compression))
    phased = lightweight_phases(ctx, groups, DRAIN_MARGIN, rate_rps)
    new = orchestrate(phased, cluster, model, workload, slo, plan.kv_transfer.compression, fix_phases=True)
    elapsed = clock() - start
    return ReplanResult(new, elapsed, float(new.estimate.get("max_rate_at_slo", 0.0)),
                        tuple(diff_plans(plan, new, model, cluster)))


def _groups_from_new_gpus(gpu_ids: list[str], cluster: Cluster, model: ModelSpec, taken: set[str]) -> list[Group]:
    """Added GPUs become groups node by node (a node that cannot hold the model joins the next one)."""
    from thunderserve.scheduler import best_group_layout

    out: list[Group] = []
    pending: list[str] = []
    by_node: dict[str, list[str]] = {}
    for gid in gpu_ids:
        by_node.setdefault(cluster.by_id[gid].node, []).append(gid)
    n = 0
    for node in sorted(by_node):
        pending += by_node[node]
        stages = best_group_layout(pending, cluster, model)
        if stages is None:
            continue
        while f"n{n}" in taken:
            n += 1
        gid = f"new{n}"
        n += 1
        out.append(Group(id=gid, phase=Phase.COLOCATED, stages=stages))
        pending = []
    return out


def full_replan(plan: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                config: Any = None, *, clock: Callable[[], float] = time.perf_counter) -> ReplanResult:
    """The two-level search from scratch on the current cluster; applying it restarts every group."""
    from thunderserve.scheduler import SchedulerConfig, plan_deployment

    cfg = config or SchedulerConfig(kv_compression=plan.kv_transfer.compression)
    start = clock()
    result = plan_deployment(cluster, model, workload, slo, cfg)
    elapsed = clock() - start
    restart = max((load_time_s(g, model, cluster) for g in result.plan.groups), default=0.0)
    changes = [Change("restart", None, "stop every worker, load the new layout everywhere", True, restart)]
    return ReplanResult(result.plan, elapsed, result.max_rate_at_slo, tuple(changes))
