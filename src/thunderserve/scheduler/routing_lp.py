"""The lower level's orchestration: a two-stage transportation LP from entry to prefill to decode groups.

Variables, per attainment level l (below): y[p,d,l] >= 0, the request rate prefilled by group p whose KV goes
to decode group d, served at level l, and x[c,l] >= 0, the rate a colocated group c serves end to end at level
l. Maximise the served rate
    Σ y + Σ x  -  ε Σ y[p,d,l] · E[KV transfer time p→d] / TTFT target      (ε: prefer fast links on ties)
subject to
    Σ_d,l y[p,d,l] / P[p,d,l] <= 1   for every prefill group p   (time-sharing p's capacity across links, levels)
    Σ_p,l y[p,d,l] / D[p,d,l] <= 1   for every decode group d
    Σ_l x[c,l] / C[c,l] <= 1         for every colocated group c
    Σ (1 - a_l) (y + x)  <=  (1 - target) Σ (y + x)                  (the SLO's attainment over all requests)
Every capacity is a rate (req/s) at which that group alone meets attainment a_l of the SLO (`PlanningContext`;
a prefill/decode pair meets it with sqrt(a_l) on each side): P[p,d,l] is p's rate when all its KV leaves over
the p→d link (TTFT, and prefill KV memory held until the transfer ends), D[p,d,l] is d's rate when all its
requests arrive over that link (TPOT includes the transfer's sojourn on the processor-sharing link). So each KV
edge is priced by its link's bandwidth, and an edge whose transfer alone would blow the TTFT budget gets no
capacity and no variable. The SLO holds for `attainment_target` of all requests, not of each group's: levels
above the target (lightly loaded groups) pay for levels below it, which only a group (or link) that cannot
reach the target at any rate is run at (e.g. decode at a TPOT target near its step time: it still serves what
the others' slack allows). A group that can reach the target is held to it: the queueing model's tails past
the target are where it is least exact, and letting every group trade (weak groups run past the target on the
strong ones' slack) served 3-6% less in the simulator on paper-cloud-32 (llama-30b, both workloads) than
holding each at the target. The time-sharing rows mix a group's levels along the chord of its
misses-vs-rate curve (convex: conservative).
Solved by HiGHS. Capacities account for the arrival variability round-robin routing leaves (second pass, see
`route`). Routing shares are the normalised flows. When no flow meets the SLO at all, the same LP runs on
stability (throughput) capacities, one level, so the plan still routes sensibly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import csc_matrix

from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Phase, Routing
from thunderserve.scheduler.context import PlanningContext, scv_bucket

EDGE_COST_WEIGHT = 1e-3  # ε: tie-break toward faster KV links, small against one request/s
MIN_SHARE = 1e-9  # flows below this fraction of the total are dropped


@dataclass(frozen=True)
class LpResult:
    """Optimal flows (req/s) and the served rate; `slo_feasible` False when stability capacities were used."""

    value_rps: float
    entry_rps: dict[str, float]
    kv_rps: dict[str, dict[str, float]]
    slo_feasible: bool
    # the capacities (req/s) the LP used, per attainment level l (`levels[l]`): per (prefill, decode, l) for
    # each side of a link, per (colocated group, l); and the flows per level, keyed the same way
    levels: tuple[float, ...] = ()
    prefill_caps: dict[tuple[str, str, int], float] = field(default_factory=dict)
    decode_caps: dict[tuple[str, str, int], float] = field(default_factory=dict)
    colocated_caps: dict[tuple[str, int], float] = field(default_factory=dict)
    kv_level_rps: dict[tuple[str, str, int], float] = field(default_factory=dict)
    colocated_level_rps: dict[tuple[str, int], float] = field(default_factory=dict)

    def routing(self) -> Routing:
        total = sum(self.entry_rps.values())
        entry = {g: v / total for g, v in sorted(self.entry_rps.items()) if v > MIN_SHARE * total}
        s = sum(entry.values())
        entry = {g: v / s for g, v in entry.items()}
        kv: dict[str, dict[str, float]] = {}
        for p, dests in sorted(self.kv_rps.items()):
            if p not in entry:
                continue
            tot = sum(dests.values())
            keep = {d: v / tot for d, v in sorted(dests.items()) if v > MIN_SHARE * tot}
            ks = sum(keep.values())
            kv[p] = {d: v / ks for d, v in keep.items()}
        return Routing(entry=entry, kv=kv)


def _linprog_max(c_max: np.ndarray, a_csc: csc_matrix, b_ub: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """argmax c·x s.t. A x <= b, 0 <= x <= upper, by HiGHS (highspy's core; scipy's linprog as fallback)."""
    hc: Any = None
    try:
        from highspy import _core  # the bindings without the console banner of highspy.Highs

        hc = _core
    except ImportError:  # pragma: no cover - older highspy layouts
        pass
    if hc is not None and hasattr(hc, "_Highs") and hasattr(hc, "HighsLp"):
        h = hc._Highs()
        h.setOptionValue("output_flag", False)
        lp = hc.HighsLp()
        lp.num_col_ = int(c_max.size)
        lp.num_row_ = int(b_ub.size)
        lp.col_cost_ = -c_max
        lp.col_lower_ = np.zeros(c_max.size)
        lp.col_upper_ = np.where(np.isfinite(upper), upper, hc.kHighsInf)
        lp.row_lower_ = np.full(b_ub.size, -hc.kHighsInf)
        lp.row_upper_ = b_ub
        lp.a_matrix_.format_ = hc.MatrixFormat.kColwise
        lp.a_matrix_.start_ = a_csc.indptr
        lp.a_matrix_.index_ = a_csc.indices
        lp.a_matrix_.value_ = a_csc.data
        h.passModel(lp)
        h.run()
        if h.getModelStatus() != hc.HighsModelStatus.kOptimal:  # pragma: no cover - always feasible, bounded
            raise PlanError(f"routing LP failed: {h.modelStatusToString(h.getModelStatus())}")
        return np.asarray(h.getSolution().col_value, dtype=float)
    res = linprog(-c_max, A_ub=a_csc, b_ub=b_ub, bounds=list(zip(np.zeros(c_max.size), upper, strict=True)),
                  method="highs")
    if res.status != 0:  # pragma: no cover
        raise PlanError(f"routing LP failed: {res.message}")
    return np.asarray(res.x, dtype=float)


# Attainment levels a group may be run at, as multiples of the SLO's miss budget (1 - target): 1.0 is the
# target itself; below 1, lightly loaded groups that leave slack; above, groups run past the target.
MISS_MULTIPLES = (0.3, 0.6, 1.0, 2.0, 3.5)
BASE_LEVEL = MISS_MULTIPLES.index(1.0)  # the level at the SLO's own target

Caps = dict[tuple[int, int, int], float]  # (prefill index, decode index, level) -> req/s


@dataclass(frozen=True)
class Solution:
    value: float
    entry: dict[str, float]
    kv: dict[str, dict[str, float]]
    kv_level: dict[tuple[str, str, int], float]
    colocated_level: dict[tuple[str, int], float]


def attainment_levels(target: float) -> tuple[float, ...]:
    """The request-level attainments a_l of `MISS_MULTIPLES` for this target (those above 0)."""
    return tuple(a for a in (1.0 - k * (1.0 - target) for k in MISS_MULTIPLES) if a > 0.0)


def _solve(prefill: Sequence[Group], decode: Sequence[Group], colocated: Sequence[Group], pcaps: Caps,
           dcaps: Caps, edge_cost: dict[tuple[int, int], float], ccaps: dict[tuple[int, int], float],
           excess: Sequence[float]) -> Solution:
    """The LP of the module docstring; `excess[l]` = target - a_l (the attainment row's coefficient)."""
    yv = sorted(k for k, c in pcaps.items() if c > 0 and dcaps.get(k, 0.0) > 0)
    xv = sorted(k for k, c in ccaps.items() if c > 0)
    ny, nvar = len(yv), len(yv) + len(xv)
    if nvar == 0:
        return Solution(0.0, {}, {}, {}, {})
    c_max = np.ones(nvar)
    np_, nd, nc = len(prefill), len(decode), len(colocated)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    level = np.asarray([k[2] for k in yv] + [k[1] for k in xv], dtype=np.int64)
    if ny:
        y = np.asarray(yv, dtype=np.int64).reshape(ny, 3)
        c_max[:ny] = 1.0 - EDGE_COST_WEIGHT * np.minimum(np.asarray([edge_cost[k[0], k[1]] for k in yv]), 1.0)
        rows += [y[:, 0], np_ + y[:, 1]]  # rows 0..P-1: prefill time-sharing; P..P+D-1: decode
        cols += [np.arange(ny), np.arange(ny)]
        vals += [1.0 / np.asarray([pcaps[k] for k in yv]), 1.0 / np.asarray([dcaps[k] for k in yv])]
    if xv:
        x = np.asarray(xv, dtype=np.int64).reshape(len(xv), 2)
        rows.append(np_ + nd + x[:, 0])  # colocated time-sharing rows
        cols.append(np.arange(ny, nvar))
        vals.append(1.0 / np.asarray([ccaps[k] for k in xv]))
    ex = np.asarray(excess, dtype=float)[level]
    if np.any(ex != 0):  # the attainment row: Σ (target - a_l) flow <= 0
        nz = np.flatnonzero(ex)
        rows.append(np.full(nz.size, np_ + nd + nc))
        cols.append(nz)
        vals.append(ex[nz])
    a = csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(np_ + nd + nc + 1, nvar))
    b_ub = np.concatenate([np.ones(np_ + nd + nc), np.zeros(1)])
    flows = np.maximum(_linprog_max(c_max, a, b_ub, np.full(nvar, np.inf)), 0.0)
    entry: dict[str, float] = {}
    kv: dict[str, dict[str, float]] = {}
    kv_level: dict[tuple[str, str, int], float] = {}
    col_level: dict[tuple[str, int], float] = {}
    for j, (pi, di, lv) in enumerate(yv):
        if flows[j] <= 0:
            continue
        p, d = prefill[pi].id, decode[di].id
        entry[p] = entry.get(p, 0.0) + float(flows[j])
        kv.setdefault(p, {})[d] = kv.get(p, {}).get(d, 0.0) + float(flows[j])
        kv_level[p, d, lv] = float(flows[j])
    for j, (ci, lv) in enumerate(xv):
        f = float(flows[ny + j])
        if f > 0:
            gid = colocated[ci].id
            entry[gid] = entry.get(gid, 0.0) + f
            col_level[gid, lv] = f
    return Solution(float(sum(entry.values())), entry, kv, kv_level, col_level)


def _capacities(ctx: PlanningContext, prefill: Sequence[Group], decode: Sequence[Group],
                colocated: Sequence[Group], spt: dict[tuple[int, int], float], scv: dict[str, float],
                levels: Sequence[float]) -> tuple[Caps, Caps, dict[tuple[int, int], float]]:
    """Capacities per edge (or colocated group) and level; a pair meets a_l with sqrt(a_l) on each side.

    Levels below the target only for what cannot reach the target (the others are held to it, see the module
    docstring), levels above it only when something runs below it (else no one needs the slack): in the common
    case this costs one capacity per edge and group, as a single-level LP does."""
    base = BASE_LEVEL
    below = range(base + 1, len(levels))
    above = range(base)

    def edge(pi: int, di: int, lv: int) -> tuple[float, float]:
        v, side = spt[pi, di], math.sqrt(levels[lv])
        pc = ctx.prefill_capacity(prefill[pi].stages, v, scv.get(prefill[pi].id, 1.0), side)
        dc = ctx.decode_capacity(decode[di].stages, v, scv.get(decode[di].id, 1.0), side) if pc > 0 else 0.0
        return pc, dc

    def col(ci: int, lv: int) -> float:
        g = colocated[ci]
        return ctx.colocated_capacity(g.stages, scv.get(g.id, 1.0), levels[lv])

    pcaps: Caps = {}
    dcaps: Caps = {}
    ccaps: dict[tuple[int, int], float] = {}
    for pi, di in spt:
        pcaps[pi, di, base], dcaps[pi, di, base] = edge(pi, di, base)
    for ci in range(len(colocated)):
        ccaps[ci, base] = col(ci, base)
    short_edges = {k for k in spt if min(pcaps[(*k, base)], dcaps[(*k, base)]) <= 0}
    short_cols = {ci for ci in range(len(colocated)) if ccaps[ci, base] <= 0}
    for pi, di in short_edges:
        for lv in below:
            pcaps[pi, di, lv], dcaps[pi, di, lv] = edge(pi, di, lv)
    for ci in short_cols:
        for lv in below:
            ccaps[ci, lv] = col(ci, lv)
    if any(v > 0 for (*_, lv), v in ccaps.items() if lv > base) or any(
            min(pcaps[k], dcaps[k]) > 0 for k in pcaps if k[2] > base):
        for pi, di in spt:
            if (pi, di) not in short_edges:
                for lv in above:
                    pcaps[pi, di, lv], dcaps[pi, di, lv] = edge(pi, di, lv)
        for ci in range(len(colocated)):
            if ci not in short_cols:
                for lv in above:
                    ccaps[ci, lv] = col(ci, lv)
    return pcaps, dcaps, ccaps


def _result(prefill: Sequence[Group], decode: Sequence[Group], colocated: Sequence[Group], sol: Solution,
            levels: tuple[float, ...], pcaps: Caps, dcaps: Caps, ccaps: dict[tuple[int, int], float]) -> LpResult:
    """An SLO-feasible result, capacities keyed by group names."""
    return LpResult(sol.value, sol.entry, sol.kv, True, levels,
                    {(prefill[a].id, decode[b].id, lv): v for (a, b, lv), v in pcaps.items()},
                    {(prefill[a].id, decode[b].id, lv): v for (a, b, lv), v in dcaps.items()},
                    {(colocated[c].id, lv): v for (c, lv), v in ccaps.items()}, sol.kv_level, sol.colocated_level)


def route(ctx: PlanningContext, groups: Sequence[Group]) -> LpResult:
    """Solve the routing LP for these groups (layouts and phases fixed).

    Two passes: capacities for Poisson arrivals give first shares; since round-robin routing hands a group
    with share s a stream of c² ≈ s (`estimate`), capacities are recomputed for those arrival c² (rounded
    to powers of two) and the LP solved again.
    """
    prefill = [g for g in groups if g.phase is Phase.PREFILL]
    decode = [g for g in groups if g.phase is Phase.DECODE]
    colocated = [g for g in groups if g.phase is Phase.COLOCATED]
    spt = {(pi, di): ctx.seconds_per_token(p.stages, d.stages)
           for pi, p in enumerate(prefill) for di, d in enumerate(decode)}
    cost = {k: ctx.edge(v).mean_s / ctx.slo.ttft_s if math.isfinite(v) else math.inf for k, v in spt.items()}
    target = ctx.slo.attainment_target
    levels = attainment_levels(target)
    excess = [target - a for a in levels]
    pcaps, dcaps, ccaps = _capacities(ctx, prefill, decode, colocated, spt, {}, levels)
    sol = _solve(prefill, decode, colocated, pcaps, dcaps, cost, ccaps, excess)
    if sol.value > 0:
        inflow: dict[str, float] = {}
        for dests in sol.kv.values():
            for d, f in dests.items():
                inflow[d] = inflow.get(d, 0.0) + f
        scv = {g: scv_bucket(f / sol.value) for g, f in list(sol.entry.items()) + list(inflow.items())}
        pcaps2, dcaps2, ccaps2 = _capacities(ctx, prefill, decode, colocated, spt, scv, levels)
        sol2 = _solve(prefill, decode, colocated, pcaps2, dcaps2, cost, ccaps2, excess)
        if sol2.value > 0:
            return _result(prefill, decode, colocated, sol2, levels, pcaps2, dcaps2, ccaps2)
        return _result(prefill, decode, colocated, sol, levels, pcaps, dcaps, ccaps)
    # No flow meets the SLO: route by stability capacities (one level) so the plan is still well formed.
    spcaps: Caps = {(*k, 0): (ctx.prefill_model(prefill[k[0]].stages).guess_capacity_rps() if math.isfinite(v)
                              else 0.0) for k, v in spt.items()}
    sdcaps: Caps = {(*k, 0): ctx.decode_model(decode[k[1]].stages).guess_capacity_rps() for k in spt}
    cost = {k: (v if math.isfinite(v) else 0.0) for k, v in cost.items()}
    sccaps = {(ci, 0): ctx.colocated_model(g.stages).guess_capacity_rps() for ci, g in enumerate(colocated)}
    sol = _solve(prefill, decode, colocated, spcaps, sdcaps, cost, sccaps, [0.0])
    if sol.value <= 0:
        raise PlanError("routing: no group can serve requests (prefill groups need a decode group reachable "
                        "over a non-zero-bandwidth link)")
    return LpResult(0.0, sol.entry, sol.kv, False)
