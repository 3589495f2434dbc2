"""The upper level: tabu search over GPU grouping and phase designation.

A state assigns every GPU to exactly one group and every group a phase; a group whose GPUs cannot hold the
model is kept in the state but serves nothing (its GPUs idle). A state's objective is the served rate of the
routing LP (`routing_lp.route`) over the usable groups, each laid out by the layout DP for its phase; ties
(within 0.01%) prefer the cheaper set of GPUs that carry traffic, then groups spanning fewer zones and nodes.

Moves: move one GPU to another group, swap two GPUs of different groups, move (or swap) all of a group's GPUs
on one node to (with) another group, merge two groups, split a group (off one node, or in halves), flip a
group's phase. Each iteration samples `neighbourhood_size` moves (seeded
`random.Random`, biased toward groups sharing a zone, i.e. fast links), scores them (layouts, queueing
models, capacities and LP results are memoised) and applies the best one that is not tabu. A move is tabu
when it touches a GPU moved, or a group created, in the last `tabu_tenure` iterations; a tabu move is still
taken when it beats the best state found (aspiration). The search stops when its evaluation budget (distinct
states scored) is spent, at `max_iterations`, after `patience` iterations without a new best, or at the
optional wall-clock deadline. Deterministic for a seed when not stopped by the clock.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Phase, Stage
from thunderserve.scheduler.align import aligned_prefill
from thunderserve.scheduler.config import SchedulerConfig
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.routing_lp import LpResult, route

GroupKey = frozenset[str]
Entry = tuple[GroupKey, Phase]
State = tuple[Entry, ...]
Attr = tuple[str, object]

MOVE_WEIGHTS = {"move": 0.15, "swap": 0.1, "move_node": 0.15, "swap_node": 0.1, "merge": 0.15, "split": 0.15,
                "flip": 0.2}
VALUE_TIE_REL = 1e-4  # objective values this close count as equal (then: cheaper, then tidier wins)
LOCAL_BIAS = 0.8  # probability of picking a partner group that shares a zone


@dataclass(frozen=True)
class Score:
    value_rps: float  # routing LP served rate at the SLO
    cost_per_hour: float  # price of the GPUs that carry traffic
    spread: int = 0  # untidiness: zones and nodes each group spans beyond its first (fewer slow links)

    def better_than(self, other: Score) -> bool:
        if self.value_rps > other.value_rps * (1 + VALUE_TIE_REL) + 1e-12:
            return True
        if self.value_rps < other.value_rps * (1 - VALUE_TIE_REL) - 1e-12:
            return False
        if abs(self.cost_per_hour - other.cost_per_hour) > 1e-9:
            return self.cost_per_hour < other.cost_per_hour
        if self.spread != other.spread:
            return self.spread < other.spread
        return self.value_rps > other.value_rps


@dataclass(frozen=True)
class Move:
    kind: str
    state: State
    touches: frozenset[Attr]  # attributes checked against the tabu list
    creates: frozenset[Attr]  # attributes made tabu when the move is applied


def canonical(entries: Sequence[Entry], order: dict[str, int]) -> State:
    return tuple(sorted((e for e in entries if e[0]), key=lambda e: min(order[g] for g in e[0])))


@dataclass
class Evaluator:
    """Scores states (memoised) and turns them into plan groups."""

    ctx: PlanningContext
    _cache: dict[State, tuple[Score, list[Group], LpResult | None]] = field(default_factory=dict)
    evaluations: int = 0

    def groups(self, state: State) -> list[Group]:
        """The state's usable groups, laid out by the layout DP; a prefill group whose decode partner sits on
        the same nodes takes the partner's layer cuts when that serves more on their link (`align`)."""
        out = []
        for i, (key, phase) in enumerate(state):
            lay = self.ctx.layout(key, phase)
            if lay is not None:
                out.append(Group(id=f"g{i}", phase=phase, stages=lay.stages))
        decode = [g.stages for g in out if g.phase is Phase.DECODE]
        return [self._aligned(g, decode) if g.phase is Phase.PREFILL else g for g in out]

    def _aligned(self, group: Group, decode: list[tuple[Stage, ...]]) -> Group:
        """`group` with the first decode partner's cuts (`align.aligned_prefill`) when they fit and serve more."""
        for dec in decode:
            stages = aligned_prefill(self.ctx.cluster, group.stages, dec)
            if stages is not None and self.ctx.perf(stages).fits:
                better = self._pair_rate(stages, dec) > self._pair_rate(group.stages, dec) * (1 + 1e-9)
                return group.model_copy(update={"stages": stages}) if better else group
        return group

    def _pair_rate(self, prefill: tuple[Stage, ...], decode: tuple[Stage, ...]) -> float:
        """What a prefill/decode pair serves on its own link (the LP's capacities at the SLO's target)."""
        spt = self.ctx.seconds_per_token(prefill, decode)
        return min(self.ctx.prefill_capacity(prefill, spt), self.ctx.decode_capacity(decode, spt))

    def best_evaluated(self) -> list[tuple[State, Score]]:
        """Every state scored so far that serves requests at the SLO, highest LP value first."""
        scored = [(st, r[0]) for st, r in self._cache.items() if r[0].value_rps > 0]
        return sorted(scored, key=lambda item: -item[1].value_rps)

    def evaluate(self, state: State) -> tuple[Score, list[Group], LpResult | None]:
        if state in self._cache:
            return self._cache[state]
        self.evaluations += 1
        groups = self.groups(state)
        lp: LpResult | None = None
        value = 0.0
        cost = 0.0
        has_decode = any(g.phase is Phase.DECODE for g in groups)
        usable = [g for g in groups if g.phase is not Phase.PREFILL or has_decode]
        if any(g.takes_requests for g in usable):
            try:
                lp = route(self.ctx, usable)
            except PlanError:  # nothing can be routed (e.g. no decode group reachable): serves nothing
                lp = None
            if lp is not None and lp.slo_feasible:
                value = lp.value_rps
                busy = set(lp.entry_rps) | {d for dests in lp.kv_rps.values() for d in dests}
                price = self.ctx.cluster.by_id
                cost = sum(price[x].price_usd_per_hour for g in usable if g.id in busy for x in g.gpus)
        by_id = self.ctx.cluster.by_id
        spread = sum(10 * (len({by_id[x].zone for x in key}) - 1) + len({by_id[x].node for x in key}) - 1
                     for key, _ in state)
        result = (Score(value, cost, spread), groups, lp)
        self._cache[state] = result
        return result


class MoveSampler:
    """Samples neighbour states of the current state (seeded, sorted iteration everywhere)."""

    def __init__(self, ctx: PlanningContext, config: SchedulerConfig) -> None:
        self.ctx = ctx
        self.phases = tuple(config.phases)
        self.rng = random.Random(config.seed)
        self.order = ctx.cluster.index_of
        self.zone = {g.id: g.zone for g in ctx.cluster.gpus}
        self.node = {g.id: g.node for g in ctx.cluster.gpus}

    def _sorted(self, key: GroupKey) -> list[str]:
        return sorted(key, key=self.order.__getitem__)

    def _partner(self, state: State, i: int) -> int | None:
        others = [j for j in range(len(state)) if j != i]
        if not others:
            return None
        zones = {self.zone[g] for g in state[i][0]}
        local = [j for j in others if any(self.zone[g] in zones for g in state[j][0])]
        pool = local if local and self.rng.random() < LOCAL_BIAS else others
        return self.rng.choice(pool)

    def _with(self, state: State, drop: Sequence[int], add: Sequence[Entry]) -> State:
        keep = [e for k, e in enumerate(state) if k not in drop]
        return canonical(keep + list(add), self.order)

    def sample(self, state: State) -> Move | None:
        kinds = sorted(MOVE_WEIGHTS)
        kind = self.rng.choices(kinds, weights=[MOVE_WEIGHTS[k] for k in kinds])[0]
        i = self.rng.randrange(len(state))
        key, phase = state[i]
        if kind == "flip":
            choices = [p for p in self.phases if p is not phase]
            if not choices:
                return None
            new = self.rng.choice(choices)
            return Move("flip", self._with(state, [i], [(key, new)]), frozenset({("flip", key)}),
                        frozenset({("flip", key)}))
        if kind == "split":
            if len(key) < 2:
                return None
            gpus = self._sorted(key)
            nodes = sorted({self.node[g] for g in gpus}, key=lambda n: min(self.order[g] for g in gpus
                                                                          if self.node[g] == n))
            if len(nodes) > 1:
                cut_node = self.rng.choice(nodes)
                a = frozenset(g for g in gpus if self.node[g] == cut_node)
            else:
                a = frozenset(gpus[: len(gpus) // 2])
            b = key - a
            pa, pb = phase, phase
            if phase is Phase.COLOCATED and {Phase.PREFILL, Phase.DECODE} <= set(self.phases) \
                    and self.rng.random() < 0.5:
                pa, pb = Phase.PREFILL, Phase.DECODE
            return Move("split", self._with(state, [i], [(a, pa), (b, pb)]), frozenset({("group", key)}),
                        frozenset({("group", a), ("group", b)}))
        j = self._partner(state, i)
        if j is None:
            return None
        key_b, phase_b = state[j]
        if kind == "merge":
            merged = key | key_b
            ph = phase if len(key) >= len(key_b) else phase_b
            return Move("merge", self._with(state, [i, j], [(merged, ph)]),
                        frozenset({("group", key), ("group", key_b)}), frozenset({("group", merged)}))
        if kind in ("move_node", "swap_node"):
            node = self.rng.choice(sorted({self.node[x] for x in key}))
            block = frozenset(x for x in key if self.node[x] == node)
            if kind == "move_node":
                return Move("move_node", self._with(state, [i, j], [(key - block, phase), (key_b | block, phase_b)]),
                            frozenset(("gpu", x) for x in block), frozenset(("gpu", x) for x in block))
            node_b = self.rng.choice(sorted({self.node[x] for x in key_b}))
            block_b = frozenset(x for x in key_b if self.node[x] == node_b)
            if node_b == node:
                return None
            moved = block | block_b
            return Move("swap_node", self._with(state, [i, j], [((key - block) | block_b, phase),
                                                                ((key_b - block_b) | block, phase_b)]),
                        frozenset(("gpu", x) for x in moved), frozenset(("gpu", x) for x in moved))
        g = self.rng.choice(self._sorted(key))
        if kind == "move":
            return Move("move", self._with(state, [i, j], [(key - {g}, phase), (key_b | {g}, phase_b)]),
                        frozenset({("gpu", g)}), frozenset({("gpu", g)}))
        # swap: only between GPUs that differ in type or node (otherwise the state does not change)
        cands = [h for h in self._sorted(key_b)
                 if self.ctx.cluster.by_id[h].spec.name != self.ctx.cluster.by_id[g].spec.name
                 or self.node[h] != self.node[g]]
        if not cands:
            return None
        h = self.rng.choice(cands)
        return Move("swap", self._with(state, [i, j], [((key - {g}) | {h}, phase), ((key_b - {h}) | {g}, phase_b)]),
                    frozenset({("gpu", g), ("gpu", h)}), frozenset({("gpu", g), ("gpu", h)}))


@dataclass(frozen=True)
class SearchResult:
    state: State
    score: Score
    iterations: int
    history: tuple[float, ...]
    evaluations: int
    stopped_by: str = "budget"  # "budget", "iterations", "patience" or "time_limit"


def tabu_search(ctx: PlanningContext, start: State, config: SchedulerConfig, *, deadline: float = float("inf"),
                progress: Callable[[float], None] | None = None,
                evaluator: Evaluator | None = None, max_evaluations: int | None = None) -> SearchResult:
    """Run the tabu search from `start` until its evaluation budget (`max_evaluations`, default
    `config.max_evaluations`, counted from this call), iterations, patience or the optional deadline
    (time.monotonic) run out."""
    ev = evaluator or Evaluator(ctx)
    budget = config.max_evaluations if max_evaluations is None else max_evaluations
    ev0 = ev.evaluations
    sampler = MoveSampler(ctx, config)
    current = start
    cur_score = ev.evaluate(current)[0]
    best, best_score = current, cur_score
    tabu: dict[Attr, int] = {}
    history: list[float] = []
    since = 0
    it = 0
    t0 = time.monotonic()
    total = max(deadline - t0, 1e-9)
    done = 0.0
    def spent() -> bool:
        return ev.evaluations - ev0 >= budget

    while it < config.max_iterations and since < config.patience and not spent() and time.monotonic() < deadline:
        it += 1
        chosen: tuple[Score, Move] | None = None
        seen: set[State] = set()
        tries = 0
        while len(seen) < config.neighbourhood_size and tries < 4 * config.neighbourhood_size:
            tries += 1
            move = sampler.sample(current)
            if move is None or move.state in seen or move.state == current:
                continue
            seen.add(move.state)
            score = ev.evaluate(move.state)[0]
            is_tabu = any(tabu.get(a, 0) >= it for a in move.touches)
            if is_tabu and not score.better_than(best_score):
                continue
            if chosen is None or score.better_than(chosen[0]):
                chosen = (score, move)
            if spent() or time.monotonic() >= deadline:
                break
        if chosen is not None:
            cur_score, move = chosen
            current = move.state
            for a in move.creates | move.touches:
                tabu[a] = it + config.tabu_tenure
            if cur_score.better_than(best_score):
                best, best_score = current, cur_score
                since = 0
            else:
                since += 1
        else:
            since += 1
        history.append(best_score.value_rps)
        if progress is not None:  # monotone: the furthest any stopping rule has got
            done = max(done, min(1.0, max(it / config.max_iterations, since / max(config.patience, 1),
                                          (ev.evaluations - ev0) / max(budget, 1),
                                          (time.monotonic() - t0) / total)))
            progress(done)
    stopped = ("budget" if spent() else "iterations" if it >= config.max_iterations
               else "patience" if since >= config.patience else "time_limit")
    return SearchResult(best, best_score, it, tuple(history), ev.evaluations, stopped)
