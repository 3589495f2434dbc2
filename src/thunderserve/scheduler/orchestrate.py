"""The lower level alone: given groups with fixed layouts, choose phases and solve the routing LP.

Two phase searches over the LP's served rate (the planner's objective, `routing_lp.route`):

`choose_phases` (the planner's start, cheap): the better of (a) every group colocated and (b) the capacity-ratio
split, where groups are sorted by prefill capacity / decode capacity and the first k become prefill groups
for the k that best balances Σ prefill against Σ decode capacity; then single-group flips while the served rate
improves (first improvement, groups in order, a few passes).

`search_phases` (the lightweight re-plan, where the phase choice is the whole decision): descents from several
starts, then a wider descent from the best local optimum:
  starts     the phases the groups have now (a re-plan that changes little flips little), the capacity-ratio
             split, `balanced_mix` (colocated where that pays, prefill/decode balanced), every group colocated;
  moves      the best single flip (one group to another phase); when none improves, the best split pair: one
             group to prefill AND another to decode. A lone new prefill group has no decode group to send KV
             to (and a lone decode group gets no requests), so single flips cannot leave all-colocated towards
             a disaggregated assignment; pairs can. They are drawn from the `PAIR_CANDIDATES` groups with the
             highest prefill/decode capacity ratio (to prefill) and the lowest (to decode), so a round costs
             O(n + PAIR_CANDIDATES²) LP solves however many groups there are;
  refine     from the best local optimum, the same descent plus double flips (any two groups to any phases,
             e.g. decode -> colocated with prefill -> decode; over every group up to
             `DOUBLE_FLIP_ALL_GROUPS` groups, else over the pair candidates), first improvement;
  memo       each assignment is solved once (starts often meet);
  budget     at most `MAX_EVALUATIONS` LP solves in all: a search that runs out returns the best assignment
             seen. With up to ~8 groups (32 GPUs) the whole search ends well within it (on the paper-cloud-32
             coding plan's six groups it reaches the exhaustive optimum over all 729 assignments with ~120
             solves); with ~20 groups (128 GPUs) the later starts are cut short.
The search is deterministic (fixed orders, ties to the earlier candidate, a budget counted in solves, not
seconds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Phase
from thunderserve.scheduler.config import ALL_PHASES
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.routing_lp import LpResult, route

MAX_FLIP_PASSES = 3
IMPROVE_REL = 1e-6
PAIR_CANDIDATES = 4  # groups per side tried in pair moves (so a pair round costs at most 12 LP solves)
MAX_DESCENT_STEPS = 64  # improving moves per start (a safety bound; descents end far sooner)
DOUBLE_FLIP_ALL_GROUPS = 8  # double flips over every group up to this many groups, else over the pair candidates
MAX_EVALUATIONS = 240  # routing-LP solves per search (~1-1.5 s CPU at 20 groups, ~0.3 s at 6 groups)

Assignment = tuple[Phase, ...]  # one phase per group, in the groups' order


def _value(ctx: PlanningContext, groups: Sequence[Group]) -> float:
    if not any(g.takes_requests for g in groups):
        return 0.0
    if any(g.phase is Phase.PREFILL for g in groups) and not any(g.phase is Phase.DECODE for g in groups):
        return 0.0
    try:
        return route(ctx, groups).value_rps
    except PlanError:  # an unroutable assignment (no reachable decode group) simply scores 0
        return 0.0


def _phase_capacity(ctx: PlanningContext, group: Group, phase: Phase) -> float:
    return ctx.group_capacity(group.with_phase(phase))


def _prefill_order(ctx: PlanningContext, groups: Sequence[Group]) -> list[int]:
    """Group indices by prefill capacity / decode capacity, highest first (ties: earlier group first)."""
    caps = [(_phase_capacity(ctx, g, Phase.PREFILL), _phase_capacity(ctx, g, Phase.DECODE)) for g in groups]
    return sorted(range(len(groups)), key=lambda i: (-(caps[i][0] / max(caps[i][1], 1e-12)), i))


def ratio_split(ctx: PlanningContext, groups: Sequence[Group]) -> list[Group]:
    """Prefill for the groups with the highest prefill/decode capacity ratio, the k that balances best."""
    caps = [(_phase_capacity(ctx, g, Phase.PREFILL), _phase_capacity(ctx, g, Phase.DECODE)) for g in groups]
    order = _prefill_order(ctx, groups)
    best_k, best_v = 1, -1.0
    for k in range(1, len(groups)):
        pre = sum(caps[i][0] for i in order[:k])
        dec = sum(caps[i][1] for i in order[k:])
        v = min(pre, dec)
        if v > best_v:
            best_k, best_v = k, v
    pre_set = set(order[:best_k])
    return [g.with_phase(Phase.PREFILL if i in pre_set else Phase.DECODE) for i, g in enumerate(groups)]


def balanced_mix(ctx: PlanningContext, groups: Sequence[Group], phases: tuple[Phase, ...] = ALL_PHASES
                 ) -> list[Group]:
    """The assignment maximising Σ colocated capacity + min(Σ prefill, Σ decode capacity) (stand-alone
    capacities, ideal KV links): each group takes the phase with the largest weighted capacity, C_i, λ·P_i or
    (1-λ)·D_i, for the λ in [0, 1] (swept over the breakpoints) that scores best. Unlike `ratio_split` it
    keeps groups colocated where that pays, e.g. one strong prefill group feeding three decode groups."""
    caps = [{ph: (_phase_capacity(ctx, g, ph) if ph in phases else -1.0) for ph in ALL_PHASES} for g in groups]

    def pick(lam: float) -> Assignment:
        w = {Phase.COLOCATED: 1.0, Phase.PREFILL: lam, Phase.DECODE: 1.0 - lam}
        return tuple(max(ALL_PHASES, key=lambda ph: (c[ph] * w[ph] if c[ph] >= 0 else -1.0, -ALL_PHASES.index(ph)))
                     for c in caps)

    def surrogate(a: Assignment) -> float:
        total = {ph: sum(c[ph] for c, p in zip(caps, a, strict=True) if p is ph) for ph in ALL_PHASES}
        return total[Phase.COLOCATED] + min(total[Phase.PREFILL], total[Phase.DECODE])

    lams = {0.0, 1.0}
    for c in caps:
        p, d, col = c[Phase.PREFILL], c[Phase.DECODE], c[Phase.COLOCATED]
        lams |= {d / (p + d)} if p + d > 0 else set()
        lams |= {col / p} if p > 0 else set()
        lams |= {1.0 - col / d} if d > 0 else set()
    trials = [pick(min(max(lam + eps, 0.0), 1.0)) for lam in sorted(x for x in lams if 0.0 <= x <= 1.0)
              for eps in (-1e-9, 1e-9)]
    best = max(trials, key=surrogate)
    return [g.with_phase(p) for g, p in zip(groups, best, strict=True)]


def _better(v: float, than: float) -> bool:
    return v > than * (1 + IMPROVE_REL) + 1e-12


def choose_phases(ctx: PlanningContext, groups: Sequence[Group], phases: tuple[Phase, ...] = ALL_PHASES
                  ) -> list[Group]:
    """Phases for fixed layouts maximising the LP's served rate (heuristic start + single flips)."""
    starts: list[list[Group]] = []
    if Phase.COLOCATED in phases:
        starts.append([g.with_phase(Phase.COLOCATED) for g in groups])
    if Phase.PREFILL in phases and Phase.DECODE in phases and len(groups) >= 2:
        starts.append(ratio_split(ctx, groups))
    if not starts:
        starts.append([g if g.phase in phases else g.with_phase(phases[0]) for g in groups])
    scored = [(_value(ctx, s), -i, s) for i, s in enumerate(starts)]
    value, _, current = max(scored, key=lambda t: (t[0], t[1]))
    current = list(current)
    for _ in range(MAX_FLIP_PASSES):
        improved = False
        for i in range(len(current)):
            for ph in phases:
                if ph is current[i].phase:
                    continue
                trial = current[:i] + [current[i].with_phase(ph)] + current[i + 1:]
                v = _value(ctx, trial)
                if _better(v, value):
                    current, value, improved = trial, v, True
        if not improved:
            break
    return current


class _Budget(Exception):
    """The search spent its LP solves: keep the best assignment found so far."""


class _Scorer:
    """LP served rate of a phase assignment, each assignment solved once, at most `budget` solves."""

    def __init__(self, ctx: PlanningContext, groups: Sequence[Group], budget: int) -> None:
        self.ctx, self.groups, self.budget = ctx, list(groups), budget
        self.memo: dict[Assignment, float] = {}

    def __call__(self, a: Assignment) -> float:
        if a not in self.memo:
            if len(self.memo) >= self.budget:
                raise _Budget
            self.memo[a] = _value(self.ctx, [g.with_phase(p) for g, p in zip(self.groups, a, strict=True)])
        return self.memo[a]


Allowed = Sequence[tuple[Phase, ...]]  # the phases each group may take, in the groups' order


def _singles(current: Assignment, allowed: Allowed) -> Iterator[Assignment]:
    """Every assignment one group's flip away (groups in order, phases in the given order)."""
    for i, cur in enumerate(current):
        for ph in allowed[i]:
            if ph is not cur:
                yield current[:i] + (ph,) + current[i + 1:]


def _split_pairs(current: Assignment, pre_rank: Sequence[int], k: int, allowed: Allowed) -> Iterator[Assignment]:
    """One group to prefill and another to decode: of the k best-ranked for each side not already in it."""
    to_prefill = [i for i in pre_rank if current[i] is not Phase.PREFILL and Phase.PREFILL in allowed[i]][:k]
    to_decode = [i for i in reversed(pre_rank) if current[i] is not Phase.DECODE and Phase.DECODE in allowed[i]][:k]
    for i in to_prefill:
        for j in to_decode:
            if i != j:
                yield tuple(Phase.PREFILL if x == i else Phase.DECODE if x == j else p for x, p in enumerate(current))


def _double_flips(current: Assignment, allowed: Allowed, candidates: Sequence[int]) -> Iterator[Assignment]:
    """Two candidate groups flipped at once, to any phases (e.g. decode -> colocated with prefill -> decode)."""
    for a, i in enumerate(candidates):
        for j in candidates[a + 1:]:
            for pi in allowed[i]:
                if pi is current[i]:
                    continue
                for pj in allowed[j]:
                    if pj is not current[j]:
                        yield tuple(pi if x == i else pj if x == j else p for x, p in enumerate(current))


def _descend(start: Assignment, allowed: Allowed, score: _Scorer, pre_rank: Sequence[int],
             best: list[tuple[float, Assignment]], doubles: bool) -> None:
    """Variable-neighbourhood descent: the best single flip; when none improves, the best split pair; when
    none improves (and `doubles`), the first improving double flip; after any improvement, single flips again.
    `best[0]` is kept up to date, so a search stopped by the budget still returns its best."""
    current = start
    value = score(start)
    if _better(value, best[0][0]):
        best[0] = (value, current)
    n = len(current)
    disagg = n >= 2 and any(Phase.PREFILL in a for a in allowed) and any(Phase.DECODE in a for a in allowed)
    k = min(PAIR_CANDIDATES, n)
    candidates = list(range(n)) if n <= DOUBLE_FLIP_ALL_GROUPS else sorted(
        set(pre_rank[:k]) | set(pre_rank[-k:]))

    def first_improvement(moves: Iterator[Assignment]) -> bool:
        nonlocal current, value
        for trial in moves:
            v = score(trial)
            if _better(v, value):
                current, value = trial, v
                return True
        return False

    def best_improvement(moves: Iterator[Assignment]) -> bool:
        nonlocal current, value
        step = max(((score(t), t) for t in moves), default=None, key=lambda vt: vt[0])
        if step is None or not _better(step[0], value):
            return False
        value, current = step
        return True

    for _ in range(MAX_DESCENT_STEPS):
        improved = best_improvement(_singles(current, allowed))
        if not improved and disagg:
            improved = best_improvement(_split_pairs(current, pre_rank, k, allowed))
        if not improved and doubles and n >= 2:
            improved = first_improvement(_double_flips(current, allowed, candidates))
        if not improved:
            return
        if _better(value, best[0][0]):
            best[0] = (value, current)


def search_phases(ctx: PlanningContext, groups: Sequence[Group], phases: tuple[Phase, ...] = ALL_PHASES,
                  max_evaluations: int = MAX_EVALUATIONS, allowed: Allowed | None = None) -> list[Group]:
    """Phases for fixed layouts maximising the LP's served rate: multi-start descent with pair moves and a
    double-flip refinement, at most `max_evaluations` routing-LP solves (deterministic; see module doc).
    `allowed` narrows the phases group by group (each a subset of `phases`; a start that breaks it is
    skipped)."""
    if not groups:
        return []
    allow: list[tuple[Phase, ...]] = [tuple(p for p in (allowed[i] if allowed else phases) if p in phases) or
                                      (phases[0],) for i in range(len(groups))]

    def ok(a: Assignment) -> bool:
        return all(p in allow[i] for i, p in enumerate(a))

    score = _Scorer(ctx, groups, max(max_evaluations, 1))
    starts: list[Assignment] = [tuple(g.phase if g.phase in allow[i] else allow[i][0] for i, g in enumerate(groups))]
    disagg = Phase.PREFILL in phases and Phase.DECODE in phases
    if disagg and len(groups) >= 2:
        starts.append(tuple(g.phase for g in ratio_split(ctx, groups)))
    starts.append(tuple(g.phase for g in balanced_mix(ctx, groups, phases)))
    if Phase.COLOCATED in phases:
        starts.append((Phase.COLOCATED,) * len(groups))
    pre_rank = _prefill_order(ctx, groups) if disagg else list(range(len(groups)))
    best: list[tuple[float, Assignment]] = [(-1.0, starts[0])]
    try:
        for s in dict.fromkeys(a for a in starts if ok(a)):  # distinct starts, in order
            _descend(s, allow, score, pre_rank, best, doubles=False)
        _descend(best[0][1], allow, score, pre_rank, best, doubles=True)  # refine the best local optimum
    except _Budget:
        pass
    return [g.with_phase(p) for g, p in zip(groups, best[0][1], strict=True)]


def drains(before: Sequence[Group], after: Sequence[Group]) -> list[str]:
    """Groups that `after` turns into prefill groups from a serving decode or colocated role: such a flip
    waits for every running sequence to finish (a minute of chat decoding), serving nothing meanwhile."""
    return [a.id for b, a in zip(before, after, strict=True) if a.phase is Phase.PREFILL and b.phase is not Phase.PREFILL]


def lightweight_phases(ctx: PlanningContext, groups: Sequence[Group], drain_margin: float,
                       rate_rps: float | None = None, phases: tuple[Phase, ...] = ALL_PHASES) -> list[Group]:
    """`search_phases` from the groups' current phases, with a switching cost for draining flips (`drains`):
    the best drain-free assignment (often the current phases, re-routed) is kept when its LP rate - the rate
    at which every group meets its share of the SLO - covers the observed `rate_rps`, or when the best
    assignment with drains beats it by no more than `drain_margin` (relative)."""
    free = search_phases(ctx, groups, phases)
    if drain_margin <= 0 or not drains(groups, free):
        return free
    calm = search_phases(ctx, groups, phases, allowed=[
        phases if g.phase is Phase.PREFILL else tuple(p for p in phases if p is not Phase.PREFILL) for g in groups])
    calm_rate = _value(ctx, calm)
    if rate_rps is not None and calm_rate >= rate_rps:
        return calm
    return free if _value(ctx, free) > calm_rate * (1 + drain_margin) else calm


def orchestrate_groups(ctx: PlanningContext, groups: Sequence[Group], *, fix_phases: bool = False,
                       phases: tuple[Phase, ...] = ALL_PHASES) -> tuple[list[Group], LpResult]:
    """(groups with chosen phases (`search_phases`), routing LP result)."""
    chosen = list(groups) if fix_phases else search_phases(ctx, groups, phases)
    return chosen, route(ctx, chosen)
