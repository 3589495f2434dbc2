"""The lower level's orchestration: a two-stage transportation LP from entry to prefill to decode groups.

Variables: y[p,d] >= 0, the request rate prefilled by group p whose KV goes to decode group d, and
x[c] >= 0, the rate a colocated group c serves end to end. Maximise the served rate
    Σ y + Σ x  -  ε Σ y[p,d] · E[KV transfer time p→d] / TTFT target      (ε: prefer fast links on ties)
subject to
    Σ_d y[p,d] / P[p,d] <= 1   for every prefill group p   (time-sharing p's capacity across its links)
    Σ_p y[p,d] / D[p,d] <= 1   for every decode group d    (time-sharing d's capacity across its links)
    x[c] <= C[c]               for every colocated group c
Every capacity is a rate (req/s) at which that group alone meets its share of the SLO attainment
(`PlanningContext`): P[p,d] is p's rate when all its KV leaves over the p→d link (TTFT, and prefill KV memory
held until the transfer ends), D[p,d] is d's rate when all its requests arrive over that link (TPOT includes
the transfer's sojourn on the processor-sharing link). So each KV edge is priced by its link's bandwidth, and
an edge whose transfer alone would blow the TTFT budget gets no capacity and no variable. Solved by HiGHS.
Capacities account for the arrival variability round-robin routing leaves (second pass, see `route`).
Routing shares are the normalised flows. When no flow meets the SLO at all, the same LP runs on stability
(throughput) capacities so the plan still routes sensibly.
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
    # the capacities (req/s) the LP used: per (prefill, decode) link for each side, per colocated group
    prefill_caps: dict[tuple[str, str], float] = field(default_factory=dict)
    decode_caps: dict[tuple[str, str], float] = field(default_factory=dict)
    colocated_caps: dict[str, float] = field(default_factory=dict)

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


def _solve(prefill: Sequence[Group], decode: Sequence[Group], colocated: Sequence[Group],
           prefill_caps: dict[tuple[int, int], float], decode_caps: dict[tuple[int, int], float],
           edge_cost: dict[tuple[int, int], float], colocated_caps: Sequence[float]
           ) -> tuple[float, dict[str, float], dict[str, dict[str, float]]]:
    edges = sorted(k for k, c in prefill_caps.items() if c > 0 and decode_caps.get(k, 0.0) > 0)
    cols = [i for i, c in enumerate(colocated_caps) if c > 0]
    ne = len(edges)
    nvar = ne + len(cols)
    if nvar == 0:
        return 0.0, {}, {}
    c_max = np.ones(nvar)
    upper = np.full(nvar, np.inf)
    if ne:
        e_arr = np.asarray(edges, dtype=np.int64).reshape(ne, 2)
        c_max[:ne] = 1.0 - EDGE_COST_WEIGHT * np.minimum(np.asarray([edge_cost[e] for e in edges]), 1.0)
        pcap = np.asarray([prefill_caps[e] for e in edges])
        dcap = np.asarray([decode_caps[e] for e in edges])
        # rows 0..P-1: prefill time-sharing; rows P..P+D-1: decode time-sharing
        rows = np.concatenate([e_arr[:, 0], len(prefill) + e_arr[:, 1]])
        colsi = np.concatenate([np.arange(ne), np.arange(ne)])
        vals = np.concatenate([1.0 / pcap, 1.0 / dcap])
        a = csc_matrix((vals, (rows, colsi)), shape=(len(prefill) + len(decode), nvar))
        b_ub = np.ones(len(prefill) + len(decode))
    else:
        a = csc_matrix((1, nvar))
        b_ub = np.zeros(1)
    for k, i in enumerate(cols):
        upper[ne + k] = colocated_caps[i]
    flows = np.maximum(_linprog_max(c_max, a, b_ub, upper), 0.0)
    entry: dict[str, float] = {}
    kv: dict[str, dict[str, float]] = {}
    for j, (pi, di) in enumerate(edges):
        if flows[j] <= 0:
            continue
        p, d = prefill[pi].id, decode[di].id
        entry[p] = entry.get(p, 0.0) + float(flows[j])
        kv.setdefault(p, {})[d] = float(flows[j])
    for k, i in enumerate(cols):
        f = float(flows[ne + k])
        if f > 0:
            entry[colocated[i].id] = f
    return float(sum(entry.values())), entry, kv


def _capacities(ctx: PlanningContext, prefill: Sequence[Group], decode: Sequence[Group],
                colocated: Sequence[Group], spt: dict[tuple[int, int], float], scv: dict[str, float]
                ) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], float], list[float]]:
    pcaps = {k: ctx.prefill_capacity(prefill[k[0]].stages, v, scv.get(prefill[k[0]].id, 1.0))
             for k, v in spt.items()}
    dcaps = {k: ctx.decode_capacity(decode[k[1]].stages, v, scv.get(decode[k[1]].id, 1.0)) if pcaps[k] > 0
             else 0.0 for k, v in spt.items()}
    ccaps = [ctx.colocated_capacity(g.stages, scv.get(g.id, 1.0)) for g in colocated]
    return pcaps, dcaps, ccaps


def _named(prefill: Sequence[Group], decode: Sequence[Group], colocated: Sequence[Group],
           pcaps: dict[tuple[int, int], float], dcaps: dict[tuple[int, int], float], ccaps: Sequence[float]
           ) -> tuple[dict[tuple[str, str], float], dict[tuple[str, str], float], dict[str, float]]:
    return ({(prefill[a].id, decode[b].id): v for (a, b), v in pcaps.items()},
            {(prefill[a].id, decode[b].id): v for (a, b), v in dcaps.items()},
            {g.id: v for g, v in zip(colocated, ccaps, strict=True)})


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
    pcaps, dcaps, ccaps = _capacities(ctx, prefill, decode, colocated, spt, {})
    value, entry, kv = _solve(prefill, decode, colocated, pcaps, dcaps, cost, ccaps)
    if value > 0:
        inflow: dict[str, float] = {}
        for dests in kv.values():
            for d, f in dests.items():
                inflow[d] = inflow.get(d, 0.0) + f
        scv = {g: scv_bucket(f / value) for g, f in list(entry.items()) + list(inflow.items())}
        pcaps, dcaps, ccaps = _capacities(ctx, prefill, decode, colocated, spt, scv)
        value2, entry2, kv2 = _solve(prefill, decode, colocated, pcaps, dcaps, cost, ccaps)
        if value2 > 0:
            return LpResult(value2, entry2, kv2, True, *_named(prefill, decode, colocated, pcaps, dcaps, ccaps))
        pcaps, dcaps, ccaps = _capacities(ctx, prefill, decode, colocated, spt, {})
        return LpResult(value, entry, kv, True, *_named(prefill, decode, colocated, pcaps, dcaps, ccaps))
    # No flow meets the SLO: route by stability capacities so the plan is still well formed.
    pcaps = {k: (ctx.prefill_model(prefill[k[0]].stages).guess_capacity_rps() if math.isfinite(v) else 0.0)
             for k, v in spt.items()}
    dcaps = {k: ctx.decode_model(decode[k[1]].stages).guess_capacity_rps() for k in spt}
    cost = {k: (v if math.isfinite(v) else 0.0) for k, v in cost.items()}
    ccaps = [ctx.colocated_model(g.stages).guess_capacity_rps() for g in colocated]
    value, entry, kv = _solve(prefill, decode, colocated, pcaps, dcaps, cost, ccaps)
    if value <= 0:
        raise PlanError("routing: no group can serve requests (prefill groups need a decode group reachable "
                        "over a non-zero-bandwidth link)")
    return LpResult(0.0, entry, kv, False)
