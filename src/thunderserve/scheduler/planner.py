"""`plan_deployment`: the two-level planner end to end.

bandwidth-aware initial grouping (`initial`) -> initial phases (`orchestrate.choose_phases` on the
initial layouts) -> tabu search over grouping and phase (`tabu`) -> final plan (`finalise`): usable groups that carry
traffic, renamed by phase (p0.., d0.., c0..), routing from the LP, estimate from the analytic model.
Optionally (`verify_top` K > 1 and a `rescore` callable, e.g. the simulator's `sim.rescore`), the K best
candidates the search evaluated (distinct parallel shapes first) and the standard homogeneous replica layouts
(`replica_candidates`) are finalised and re-scored, and the best re-scored one is returned: the analytic
estimate ranks plans well on the whole but can misjudge a regime (e.g. pipelined decode at a very tight TPOT),
which a simulation of a few candidates catches at planning cost (outside the time limit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from thunderserve.costmodel.comm import Compression
from thunderserve.costmodel.perf import MEMORY_UTILIZATION
from thunderserve.errors import InfeasibleError, PlanError
from thunderserve.plan.model import Group, Phase, Plan
from thunderserve.scheduler.config import PlanResult, SchedulerConfig
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.finalise import final_plan, verify_candidates
from thunderserve.scheduler.initial import initial_groups, typed_node_pairs, typed_node_runs
from thunderserve.scheduler.orchestrate import choose_phases
from thunderserve.scheduler.tabu import (
    VALUE_TIE_REL,
    Evaluator,
    Score,
    SearchResult,
    State,
    canonical,
    tabu_search,
)
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

FINALISE_RESERVE_S = 1.0  # time kept for the final plan's routing and estimate
Rescorer = Callable[[list[Plan]], list[float]]  # plans -> their re-scored max rate at the SLO (req/s)


def _infeasible(cluster: Cluster, model: ModelSpec) -> InfeasibleError:
    usable = sum(g.spec.memory_gb * MEMORY_UTILIZATION for g in cluster.gpus)
    gpus = f"{cluster.num_gpus} GPU" + ("s" if cluster.num_gpus != 1 else "")
    return InfeasibleError(
        f"model {model.name} ({model.weight_bytes / 1e9:.1f} GB of weights) cannot fit on cluster "
        f"{cluster.name} ({gpus}, {usable:.1f} GB usable) with at most the allowed pipeline stages and room "
        f"for KV cache")


def _start_state(ctx: PlanningContext, config: SchedulerConfig, deadline: float = float("inf"),
                 keys: list[frozenset[str]] | None = None) -> State:
    """A starting state: `keys` (default: the bandwidth-aware initial grouping) phased by `choose_phases`."""
    if keys is None:
        keys = initial_groups(ctx, config.seed, config.phases, deadline)
    usable = [k for k in keys if any(ctx.layout(k, ph) is not None for ph in config.phases)]
    if not usable:
        whole = frozenset(g.id for g in ctx.cluster.gpus)
        if all(ctx.layout(whole, ph) is None for ph in config.phases):
            raise _infeasible(ctx.cluster, ctx.model)
        keys = [whole]
        usable = keys
    # initial phases: the orchestration heuristic on each group's colocated (phase-neutral) layout
    provisional = []
    for i, k in enumerate(usable):
        ph = next(p for p in (Phase.COLOCATED, Phase.DECODE, Phase.PREFILL)
                  if p in config.phases and ctx.layout(k, p) is not None) if any(
            ctx.layout(k, p) is not None for p in config.phases) else config.phases[0]
        lay = ctx.layout(k, ph)
        assert lay is not None
        provisional.append(Group(id=f"g{i}", phase=ph, stages=lay.stages))
    phased = choose_phases(ctx, provisional, tuple(config.phases))
    phase_of = {frozenset(g.gpus): g.phase for g in phased}
    entries = [(k, phase_of.get(k, config.phases[0])) for k in keys]
    return canonical(entries, ctx.cluster.index_of)


def _start_phase_sets(phases: tuple[Phase, ...]) -> list[tuple[Phase, ...]]:
    """The phase sets the starting solutions are built for: the allowed set, and when it allows both
    disaggregation and colocation, each of them alone too. One start cannot serve both regimes: a loose TPOT
    target favours colocated (chunked-prefill) groups, a tight one a prefill/decode split, and single moves
    from one regime rarely reach the other (every intermediate mix scores lower)."""
    sets = [phases]
    if {Phase.PREFILL, Phase.DECODE} <= set(phases) and Phase.COLOCATED in phases:
        sets += [(Phase.PREFILL, Phase.DECODE), (Phase.COLOCATED,)]
    return sets


def _best_start(ctx: PlanningContext, config: SchedulerConfig, ev: Evaluator, deadline: float) -> State:
    """The best-scoring starting solution over `_start_phase_sets` (the first when they tie)."""
    sets = _start_phase_sets(tuple(config.phases))
    best: tuple[State, Score] | None = None
    now = time.monotonic()
    for i, phases in enumerate(sets):
        # each start gets an equal share of what is left of the initial budget
        share = now + (deadline - now) / (len(sets) - i)
        try:
            state = _start_state(ctx, replace(config, phases=phases), share)
        except InfeasibleError:
            if i == 0:
                raise
            continue
        score = ev.evaluate(state)[0]
        if best is None or score.better_than(best[1]):
            best = (state, score)
        now = time.monotonic()
    assert best is not None
    if time.monotonic() < deadline:
        typed = _best_typed_runs(ctx, config, ev, deadline)
        if typed is not None and typed[1].better_than(best[1]):
            best = typed
    return best[0]


def _best_typed_runs(ctx: PlanningContext, config: SchedulerConfig, ev: Evaluator, deadline: float
                     ) -> tuple[State, Score] | None:
    """The best `typed_node_runs` start, and (when both phases are allowed) the best `typed_node_pairs` one:
    the same run length k = 1..max_pp for every type, then each type's k changed alone while that improves the
    objective (types in name order, ties to the shorter run). A peer's standard homogeneous layouts (vLLM's
    replicas and pipelines, DistServe's per-node prefill and decode segments) are then never out of the
    search's reach, whatever the budget."""
    split_ok = {Phase.PREFILL, Phase.DECODE} <= set(config.phases)
    found = [_typed_descent(ctx, config, ev, deadline, split) for split in ((False, True) if split_ok else (False,))]
    runs = [f for f in found if f is not None]
    if not runs:
        return None
    best = runs[0]
    for r in runs[1:]:
        if r[1].better_than(best[1]):
            best = r
    return best


def _typed_descent(ctx: PlanningContext, config: SchedulerConfig, ev: Evaluator, deadline: float, split: bool
                   ) -> tuple[State, Score] | None:
    """`_best_typed_runs` for whole runs (`split` False) or prefill/decode halves (True)."""
    types = ctx.cluster.gpu_types()
    node_counts = {t: len({g.node_index for g in ctx.cluster.gpus if g.spec.name == t}) for t in types}
    ks = list(range(1, ctx.max_pp + 1))
    best: tuple[State, Score, dict[str, int]] | None = None

    def trial(k_of_type: dict[str, int]) -> None:
        nonlocal best
        try:
            if split:
                state = canonical(typed_node_pairs(ctx, k_of_type), ctx.cluster.index_of)
            else:
                state = _start_state(ctx, config, keys=typed_node_runs(ctx, k_of_type))
        except InfeasibleError:
            return
        score = ev.evaluate(state)[0]
        if best is None or score.better_than(best[1]):
            best = (state, score, dict(k_of_type))

    for k in ks:
        if any(node_counts[t] >= k for t in types) and time.monotonic() < deadline:
            trial({t: k for t in types})
    if best is None:
        return None
    for t in types:
        for k in ks:
            if k != best[2][t] and k <= node_counts[t] and time.monotonic() < deadline:
                trial({**best[2], t: k})
    return best[0], best[1]


INTENSIFY_FRACTION = 0.6  # share of the search budget (and time cap) spent inside the starting solution's regime


def _regime(state: State, phases: tuple[Phase, ...]) -> tuple[Phase, ...]:
    """The phases of the start's regime: colocated only, split only, or (a mix) everything allowed."""
    used = {ph for _, ph in state}
    if used == {Phase.COLOCATED}:
        return (Phase.COLOCATED,)
    if Phase.COLOCATED not in used and {Phase.PREFILL, Phase.DECODE} <= set(phases):
        return (Phase.PREFILL, Phase.DECODE)
    return phases


def _two_phase_search(ctx: PlanningContext, start: State, config: SchedulerConfig, deadline: float,
                      progress: Callable[[float], None] | None, ev: Evaluator) -> SearchResult:
    """Tabu search inside the start's regime first (every sampled move then reshapes groups instead of
    flipping them to a phase that rarely pays off there), then over every allowed phase from the best found.
    On coding at the default SLO the all-phase search alone ended 4% below the colocated-only one."""
    regime = _regime(start, tuple(config.phases))
    if set(regime) == set(config.phases):
        return tabu_search(ctx, start, config, deadline=deadline, progress=progress, evaluator=ev)
    now = time.monotonic()
    mid = now + INTENSIFY_FRACTION * max(deadline - now, 0.0) if deadline < float("inf") else deadline
    first_budget = round(INTENSIFY_FRACTION * config.max_evaluations)

    def part(lo: float, hi: float) -> Callable[[float], None] | None:
        return None if progress is None else (lambda f: progress(lo + (hi - lo) * f))

    ev0 = ev.evaluations
    first = tabu_search(ctx, start, replace(config, phases=regime), deadline=mid,
                        progress=part(0.0, INTENSIFY_FRACTION), evaluator=ev, max_evaluations=first_budget)
    spent = ev.evaluations - ev0
    second = tabu_search(ctx, first.state, config, deadline=deadline, progress=part(INTENSIFY_FRACTION, 1.0),
                         evaluator=ev, max_evaluations=max(config.max_evaluations - spent, 0))
    best = second if second.score.better_than(first.score) else first
    return SearchResult(best.state, best.score, first.iterations + second.iterations,
                        first.history + second.history, second.evaluations, second.stopped_by)


def _best_level(ctx: PlanningContext, config: SchedulerConfig, plan: Plan, state: State, rate_rps: float | None
                ) -> Plan:
    """`plan` (finalised at `config.kv_compression`), or the same state finalised at one of
    `config.kv_alternatives` when the estimate rates that higher; ties (within the search's tie band) go to the
    less compressed level, which moves the exact cache: where no KV crosses a slow link, compression only costs
    codec time."""
    order = list(Compression)  # none, int8, int4: least compressed first
    best, best_rate = plan, float(plan.estimate["max_rate_at_slo"])
    for level in config.kv_alternatives:
        if level == ctx.compression:
            continue
        alt_ctx = PlanningContext(ctx.cluster, ctx.model, ctx.workload, ctx.slo, level, ctx.max_pp)
        try:
            alt = final_plan(alt_ctx, Evaluator(alt_ctx), state, rate_rps)
        except (PlanError, InfeasibleError):
            continue
        rate = float(alt.estimate["max_rate_at_slo"])
        tie = abs(rate - best_rate) <= VALUE_TIE_REL * max(best_rate, 1e-12)
        if (rate > best_rate and not tie) or (tie and order.index(level) < order.index(
                best.kv_transfer.compression)):
            best, best_rate = alt, rate
    return best


def plan_deployment(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                    config: SchedulerConfig = SchedulerConfig(), rate_rps: float | None = None,
                    progress: Callable[[float], None] | None = None, rescore: Rescorer | None = None
                    ) -> PlanResult:
    """Plan groups, phases, layouts and routing maximising the estimated request rate at the SLO.

    `rate_rps` (optional) is the rate the estimate's attainment/latencies are reported at (default: the max
    rate). With `config.verify_top` > 1, `rescore` re-scores that many top candidates (see the module
    docstring). Raises InfeasibleError when the model cannot fit on the whole cluster.
    """
    if config.verify_top > 1 and rescore is None:
        raise ValueError("verify_top needs a rescore function (e.g. thunderserve.sim.rescore)")
    t0 = time.monotonic()
    # with a time cap, the search stops early enough for the final routing and estimate to fit in it
    cap = config.time_limit_s
    deadline = float("inf") if cap is None else t0 + cap - min(FINALISE_RESERVE_S, 0.1 * cap)
    initial_deadline = float("inf") if cap is None else t0 + cap * config.time_budget_fraction_initial
    ctx = PlanningContext(cluster, model, workload, slo, config.kv_compression, config.max_pp)
    total_bytes = sum(g.spec.memory_gb * 1e9 * MEMORY_UTILIZATION for g in cluster.gpus)
    if model.weight_bytes >= total_bytes:
        raise _infeasible(cluster, model)
    ev = Evaluator(ctx)
    start = _best_start(ctx, config, ev, initial_deadline)
    result = _two_phase_search(ctx, start, config, deadline, progress, ev)
    verified: tuple[tuple[float, float], ...] = ()
    if config.verify_top > 1 and rescore is not None:
        plans = verify_candidates(ctx, ev, result.state, config.verify_top, rate_rps)
        rates = rescore(plans)
        verified = tuple((float(p.estimate["max_rate_at_slo"]), float(r)) for p, r in zip(plans, rates, strict=True))
        pick = max(range(len(plans)), key=lambda i: (rates[i], -i))  # ties: the better estimate
        plan = plans[pick].model_copy(update={"estimate": {**plans[pick].estimate,
                                                           "verified_max_rate_rps": float(rates[pick])}})
    else:
        plan = _best_level(ctx, config, final_plan(ctx, ev, result.state, rate_rps), result.state, rate_rps)
    if progress is not None:
        progress(1.0)
    return PlanResult(plan=plan, max_rate_at_slo=float(plan.estimate["max_rate_at_slo"]),
                      decision_time_s=time.monotonic() - t0, iterations=result.iterations,
                      history=result.history, start_objective=ev.evaluate(start)[0].value_rps, verified=verified,
                      evaluations=result.evaluations, stopped_by=result.stopped_by)
