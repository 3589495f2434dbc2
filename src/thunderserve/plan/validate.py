"""Plan validation against a cluster and a model: every check names what is wrong, in one line."""

from __future__ import annotations

import math

from thunderserve.costmodel.kv import kv_seconds_per_token
from thunderserve.costmodel.perf import GroupPerf, group_perf
from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Phase, Plan
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec

SHARE_TOLERANCE = 1e-6


def group_perf_of(group: Group, model: ModelSpec, cluster: Cluster) -> GroupPerf:
    """Cost model of a plan group (GPU ids resolved on the cluster)."""
    stages = [([cluster.by_id[g] for g in s.gpus], s.num_layers) for s in group.stages]
    return group_perf(model, stages, cluster)


def _check_shares(where: str, shares: dict[str, float]) -> None:
    if not shares:
        raise PlanError(f"{where}: no shares given")
    for k, v in shares.items():
        if not (v >= 0 and math.isfinite(v)):
            raise PlanError(f"{where}.{k}: share must be a finite number >= 0, got {v}")
    total = sum(shares.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise PlanError(f"{where}: shares sum to {total:.6f}, not 1")


def validate_structure(plan: Plan, cluster: Cluster, model: ModelSpec) -> None:
    """GPUs exist and are used once, layers cover the model in order, memory fits."""
    seen: dict[str, str] = {}
    ids: set[str] = set()
    for group in plan.groups:
        if group.id in ids:
            raise PlanError(f"groups: duplicate group id '{group.id}'")
        ids.add(group.id)
        expect = 0
        for si, stage in enumerate(group.stages):
            where = f"groups.{group.id}.stages.{si}"
            for gid in stage.gpus:
                if gid not in cluster.by_id:
                    raise PlanError(f"{where}.gpus: GPU '{gid}' is not in cluster {cluster.name}")
                if gid in seen:
                    raise PlanError(f"{where}.gpus: GPU '{gid}' is already used by group '{seen[gid]}'")
                seen[gid] = group.id
            start, end = stage.layers
            if start != expect or end <= start:
                raise PlanError(f"{where}.layers: expected a range starting at {expect}, got [{start}, {end})")
            expect = end
        if expect != model.num_layers:
            raise PlanError(f"groups.{group.id}: stages cover layers [0, {expect}), model {model.name} has "
                            f"{model.num_layers}")
        perf = group_perf_of(group, model, cluster)
        for si, sp in enumerate(perf.stages):
            if not sp.fits:
                raise PlanError(f"groups.{group.id}.stages.{si}: does not fit in memory "
                                f"({sp.max_gpu_used_bytes / 1e9:.1f} GB needed per GPU before KV cache, "
                                f"{sp.min_gpu_capacity_bytes / 1e9:.1f} GB usable)")
        for si, bw in enumerate(perf.send_bytes_s):
            if bw <= 0:
                raise PlanError(f"groups.{group.id}.stages.{si}: zero-bandwidth link to the next stage")
        for si, sp in enumerate(perf.stages):
            if sp.tp > 1 and sp.link_bytes_s <= 0:
                raise PlanError(f"groups.{group.id}.stages.{si}: zero-bandwidth link inside the TP set")
    if not plan.groups_in(Phase.PREFILL, Phase.COLOCATED):
        raise PlanError("groups: no prefill or colocated group to take requests")
    if plan.groups_in(Phase.PREFILL) and not plan.groups_in(Phase.DECODE):
        raise PlanError("groups: prefill groups need at least one decode group")


def validate_routing(plan: Plan, cluster: Cluster, model: ModelSpec) -> None:
    """Entry shares over prefill/colocated groups, KV shares over decode groups, each summing to 1."""
    routing = plan.routing
    if routing is None:
        raise PlanError("routing: missing")
    phase = {g.id: g.phase for g in plan.groups}
    _check_shares("routing.entry", routing.entry)
    for gid in routing.entry:
        if gid not in phase:
            raise PlanError(f"routing.entry.{gid}: unknown group")
        if phase[gid] is Phase.DECODE:
            raise PlanError(f"routing.entry.{gid}: a decode group cannot take arriving requests")
    for gid, ph in phase.items():
        if ph is Phase.PREFILL and routing.entry.get(gid, 0) > 0 and gid not in routing.kv:
            raise PlanError(f"routing.kv: prefill group '{gid}' has no KV destination")
    for src, dests in routing.kv.items():
        if phase.get(src) is not Phase.PREFILL:
            raise PlanError(f"routing.kv.{src}: not a prefill group")
        _check_shares(f"routing.kv.{src}", dests)
        for dst, share in dests.items():
            if phase.get(dst) is not Phase.DECODE:
                raise PlanError(f"routing.kv.{src}.{dst}: not a decode group")
            if share > 0:
                sp = plan.group(src)
                dg = plan.group(dst)
                rate = kv_seconds_per_token(model, [([cluster.by_id[g] for g in s.gpus], s.num_layers)
                                                    for s in sp.stages],
                                            [cluster.by_id[g] for g in dg.gpus], cluster, plan.kv_transfer.compression)
                if math.isinf(rate):
                    raise PlanError(f"routing.kv.{src}.{dst}: zero-bandwidth link between the groups")


def validate_plan(plan: Plan, cluster: Cluster, model: ModelSpec, *, require_routing: bool = True) -> None:
    """Raise PlanError on the first problem; returns None when the plan can be run as is."""
    if plan.model != model.name:
        raise PlanError(f"model: plan is for '{plan.model}', not '{model.name}'")
    validate_structure(plan, cluster, model)
    if plan.routing is not None or require_routing:
        validate_routing(plan, cluster, model)
