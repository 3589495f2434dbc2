"""The lower level alone: given groups with fixed layouts, choose phases and solve the routing LP.

Phase choice (unless fixed): start from the better of (a) every group colocated and (b) the capacity-ratio
split, where groups are sorted by prefill capacity / decode capacity and the first k become prefill groups
for the k that best balances Σ prefill against Σ decode capacity; then flip single groups' phases while
the LP's served rate improves (first improvement, groups in order, a few passes).
"""

from __future__ import annotations

from collections.abc import Sequence

from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Phase
from thunderserve.scheduler.config import ALL_PHASES
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.routing_lp import LpResult, route

MAX_FLIP_PASSES = 3
IMPROVE_REL = 1e-6


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


def ratio_split(ctx: PlanningContext, groups: Sequence[Group]) -> list[Group]:
    """Prefill for the groups with the highest prefill/decode capacity ratio, the k that balances best."""
    caps = [(_phase_capacity(ctx, g, Phase.PREFILL), _phase_capacity(ctx, g, Phase.DECODE)) for g in groups]
    order = sorted(range(len(groups)), key=lambda i: (-(caps[i][0] / max(caps[i][1], 1e-12)), i))
    best_k, best_v = 1, -1.0
    for k in range(1, len(groups)):
        pre = sum(caps[i][0] for i in order[:k])
        dec = sum(caps[i][1] for i in order[k:])
        v = min(pre, dec)
        if v > best_v:
            best_k, best_v = k, v
    pre_set = set(order[:best_k])
    return [g.with_phase(Phase.PREFILL if i in pre_set else Phase.DECODE) for i, g in enumerate(groups)]


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
                if v > value * (1 + IMPROVE_REL) + 1e-12:
                    current, value, improved = trial, v, True
        if not improved:
            break
    return current


def orchestrate_groups(ctx: PlanningContext, groups: Sequence[Group], *, fix_phases: bool = False,
                       phases: tuple[Phase, ...] = ALL_PHASES) -> tuple[list[Group], LpResult]:
    """(groups with chosen phases, routing LP result)."""
    chosen = list(groups) if fix_phases else choose_phases(ctx, groups, phases)
    return chosen, route(ctx, chosen)
