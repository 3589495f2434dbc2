"""From a search state (or explicit groups) to a plan: groups that carry traffic, renamed by phase (p0.., d0..,
c0..), routed by the LP, validated, with the analytic estimate; and the extra candidates `verify_top` re-scores
(see `planner`)."""

from __future__ import annotations

from thunderserve.errors import InfeasibleError, PlanError
from thunderserve.plan.model import Group, KvTransfer, Phase, Plan, Stage
from thunderserve.plan.validate import validate_plan
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.estimate import plan_estimate
from thunderserve.scheduler.routing_lp import route
from thunderserve.scheduler.tabu import Evaluator, State

PHASE_PREFIX = {Phase.PREFILL: "p", Phase.DECODE: "d", Phase.COLOCATED: "c"}


def final_plan(ctx: PlanningContext, ev: Evaluator, state: State, rate_rps: float | None) -> Plan:
    _, groups, lp = ev.evaluate(state)
    if lp is not None and lp.value_rps > 0:
        busy = set(lp.entry_rps) | {d for dests in lp.kv_rps.values() for d in dests}
        groups = [g for g in groups if g.id in busy]
    else:  # nothing meets the SLO: keep every group that can take part
        has_decode = any(g.phase is Phase.DECODE for g in groups)
        groups = [g for g in groups if g.phase is not Phase.PREFILL or has_decode]
    return plan_of(ctx, groups, rate_rps)


def plan_of(ctx: PlanningContext, groups: list[Group], rate_rps: float | None) -> Plan:
    """Groups renamed by phase (p0.., d0.., c0..), routed by the LP, validated, with the analytic estimate."""
    counters = {ph: 0 for ph in Phase}
    named = []
    for g in groups:
        named.append(g.model_copy(update={"id": f"{PHASE_PREFIX[g.phase]}{counters[g.phase]}"}))
        counters[g.phase] += 1
    try:
        final_lp = route(ctx, named)
    except PlanError as exc:
        raise InfeasibleError(f"no deployment can serve requests on cluster {ctx.cluster.name} with phases "
                              f"{', '.join(p.value for p in sorted({g.phase for g in named}))}: {exc}") from None
    plan = Plan(model=ctx.model.name, cluster=ctx.cluster.name, kv_transfer=KvTransfer(compression=ctx.compression),
                groups=tuple(named), routing=final_lp.routing())
    validate_plan(plan, ctx.cluster, ctx.model)
    est = plan_estimate(ctx, plan, rate_rps, extra={"lp_rate_rps": final_lp.value_rps})
    return plan.model_copy(update={"estimate": est})


def replica_candidates(ctx: PlanningContext, rate_rps: float | None) -> list[Plan]:
    """The standard homogeneous layouts: every node carved into colocated single-stage TP-t replicas wherever
    the model fits on t of its GPUs (nodes where it does not stay idle), one plan per t, plus one plan with
    each GPU type at the t whose replicas the estimate rates highest in total (vLLM's per-type choice). They
    are in the planner's search space but far from where a local search walks when the estimate misjudges a
    regime; `verify_top` re-scores them next to the search's candidates."""
    by_node: dict[str, list[str]] = {}
    for g in ctx.cluster.gpus:
        by_node.setdefault(g.node, []).append(g.id)

    degrees = (1, 2, 4, 8)
    replicas: dict[tuple[str, int], list[Group]] = {}  # (node, t) -> its TP-t replicas that hold the model
    for node, ids in by_node.items():
        for t in degrees:
            stages = [(Stage(gpus=tuple(ids[i * t:(i + 1) * t]), layers=(0, ctx.model.num_layers)),)
                      for i in range(len(ids) // t)]
            replicas[node, t] = [Group(id=f"{node}-{i}", phase=Phase.COLOCATED, stages=st)
                                 for i, st in enumerate(stages) if ctx.perf(st).fits]
    nodes = sorted(by_node)
    layouts = [[g for n in nodes for g in replicas[n, t]] for t in degrees]
    per_type: list[Group] = []
    for gpu_type in ctx.cluster.gpu_types():
        of_type = [n for n in nodes if ctx.cluster.by_id[by_node[n][0]].spec.name == gpu_type]
        options = [[g for n in of_type for g in replicas[n, t]] for t in degrees]
        rated = [(sum(ctx.colocated_capacity(g.stages) for g in gs), -i) for i, gs in enumerate(options) if gs]
        if rated:
            per_type += options[-max(rated)[1]]
    layouts.append(per_type)
    plans: list[Plan] = []
    seen: set[tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]] = set()
    for groups in layouts:
        if not groups:
            continue
        try:
            plan = plan_of(ctx, groups, rate_rps)
        except (PlanError, InfeasibleError):
            continue
        if signature(plan) not in seen:
            seen.add(signature(plan))
            plans.append(plan)
    return plans


def signature(plan: Plan) -> tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]:
    """A plan's groups as (phase, GPUs per stage), order-free: equal for plans that differ only in names."""
    return tuple(sorted((g.phase.value, tuple(s.gpus for s in g.stages)) for g in plan.groups))


def _shape(groups: list[Group]) -> tuple[tuple[str, int, int], ...]:
    """A candidate's parallel shape: the sorted (phase, pipeline stages, TP degree) of its groups."""
    return tuple(sorted((g.phase.value, g.pp, min(st.tp for st in g.stages)) for g in groups))


def verify_candidates(ctx: PlanningContext, ev: Evaluator, best: State, k: int, rate_rps: float | None
                      ) -> list[Plan]:
    """What `verify_top` re-scores: `search_candidates` (the search's best first), then the replica layouts
    not among them."""
    plans = search_candidates(ctx, ev, best, k, rate_rps)
    seen = {signature(p) for p in plans}
    return plans + [p for p in replica_candidates(ctx, rate_rps) if signature(p) not in seen]


def search_candidates(ctx: PlanningContext, ev: Evaluator, best: State, k: int, rate_rps: float | None
                      ) -> list[Plan]:
    """Up to `k` plans to re-score: the search's best, then the best-valued evaluated state of each other
    parallel shape (a different mix of phases and layouts is where the estimate may misjudge), then the next
    best by value. States that do not finalise into a plan are skipped."""
    states = [best]
    shapes = {_shape(ev.evaluate(best)[1])}
    ranked = [st for st, _ in ev.best_evaluated() if st != best]
    for st in ranked:  # one per new shape, best value first
        if len(states) >= k:
            break
        shape = _shape(ev.evaluate(st)[1])
        if shape not in shapes:
            shapes.add(shape)
            states.append(st)
    for st in ranked:  # fill up by value
        if len(states) >= k:
            break
        if st not in states:
            states.append(st)
    plans: list[Plan] = []
    for st in states:
        try:
            plans.append(final_plan(ctx, ev, st, rate_rps))
        except PlanError:
            continue
    return plans
