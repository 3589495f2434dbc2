"""The lower level's orchestration: a two-stage transportation LP from entry to prefill to decode groups.

Variables: y[p,d] >= 0, the request rate prefilled by group p whose KV goes to decode group d, and
x[c] >= 0, the rate a colocated group c serves end to end. Maximise the served rate
    Σ y + Σ x  -  ε Σ y[p,d] · E[KV transfer time p→d] / TTFT target      (ε: prefer fast links on ties)
subject to
    Σ_d y[p,d] / C[p,d] <= 1   for every prefill group p   (time-sharing p's capacity across its edges)
    Σ_p y[p,d]          <= C[d] for every decode group d
    x[c]                <= C[c] for every colocated group c
where every capacity is a rate (req/s) at which that group alone meets its share of the SLO attainment
(`PlanningContext`): C[p,d] is p's rate when all its KV crosses the p→d link, so the KV edge is priced by
the link's bandwidth (prefill queue + link queue + transfer must fit the TTFT target) and an edge whose
transfer alone would blow the TTFT budget has no capacity and no variable. Solved by HiGHS. Routing shares
are the normalised flows. When no flow meets the SLO at all, the same LP runs on stability (throughput)
capacities so the plan still routes sensibly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Phase, Routing
from thunderserve.scheduler.context import PlanningContext

EDGE_COST_WEIGHT = 1e-3  # ε: tie-break toward faster KV links, small against one request/s
MIN_SHARE = 1e-9  # flows below this fraction of the total are dropped


@dataclass(frozen=True)
class LpResult:
    """Optimal flows (req/s) and the served rate; `slo_feasible` False when stability capacities were used."""

    value_rps: float
    entry_rps: dict[str, float]
    kv_rps: dict[str, dict[str, float]]
    slo_feasible: bool

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


def _solve(prefill: Sequence[Group], decode: Sequence[Group], colocated: Sequence[Group],
           edge_caps: dict[tuple[int, int], float], edge_cost: dict[tuple[int, int], float],
           decode_caps: Sequence[float], colocated_caps: Sequence[float]) -> tuple[float, dict[str, float],
                                                                              dict[str, dict[str, float]]]:
    edges = sorted(k for k, c in edge_caps.items() if c > 0)
    cols = [i for i, c in enumerate(colocated_caps) if c > 0]
    nvar = len(edges) + len(cols)
    if nvar == 0:
        return 0.0, {}, {}
    c = np.empty(nvar)
    for j, e in enumerate(edges):
        c[j] = -(1.0 - EDGE_COST_WEIGHT * edge_cost[e])
    c[len(edges):] = -1.0
    rows, colsi, vals, rhs = [], [], [], []
    r = 0
    for pi in range(len(prefill)):
        js = [j for j, e in enumerate(edges) if e[0] == pi]
        if not js:
            continue
        for j in js:
            rows.append(r)
            colsi.append(j)
            vals.append(1.0 / edge_caps[edges[j]])
        rhs.append(1.0)
        r += 1
    for di in range(len(decode)):
        js = [j for j, e in enumerate(edges) if e[1] == di]
        if not js:
            continue
        for j in js:
            rows.append(r)
            colsi.append(j)
            vals.append(1.0)
        rhs.append(decode_caps[di])
        r += 1
    bounds = [(0.0, None)] * len(edges) + [(0.0, colocated_caps[i]) for i in cols]
    a_ub = coo_matrix((vals, (rows, colsi)), shape=(r, nvar)).tocsr() if r else None
    res = linprog(c, A_ub=a_ub, b_ub=np.asarray(rhs) if r else None, bounds=bounds, method="highs")
    if res.status != 0:  # pragma: no cover - the LP is always feasible (0 is) and bounded
        raise PlanError(f"routing LP failed: {res.message}")
    flows = np.maximum(res.x, 0.0)
    entry: dict[str, float] = {}
    kv: dict[str, dict[str, float]] = {}
    for j, (pi, di) in enumerate(edges):
        if flows[j] <= 0:
            continue
        p, d = prefill[pi].id, decode[di].id
        entry[p] = entry.get(p, 0.0) + float(flows[j])
        kv.setdefault(p, {})[d] = float(flows[j])
    for k, i in enumerate(cols):
        f = float(flows[len(edges) + k])
        if f > 0:
            entry[colocated[i].id] = f
    return float(sum(entry.values())), entry, kv


def route(ctx: PlanningContext, groups: Sequence[Group]) -> LpResult:
    """Solve the routing LP for these groups (layouts and phases fixed)."""
    prefill = [g for g in groups if g.phase is Phase.PREFILL]
    decode = [g for g in groups if g.phase is Phase.DECODE]
    colocated = [g for g in groups if g.phase is Phase.COLOCATED]
    spt = {(pi, di): ctx.seconds_per_token(p.stages, frozenset(d.gpus))
           for pi, p in enumerate(prefill) for di, d in enumerate(decode)}
    cost = {k: ctx.edge(v).mean_s / ctx.slo.ttft_s if math.isfinite(v) else math.inf for k, v in spt.items()}
    caps = {k: ctx.edge_capacity(prefill[k[0]].stages, v) for k, v in spt.items()}
    dcaps = [ctx.decode_capacity(d.stages) for d in decode]
    ccaps = [ctx.colocated_capacity(g.stages) for g in colocated]
    value, entry, kv = _solve(prefill, decode, colocated, caps, cost, dcaps, ccaps)
    if value > 0:
        return LpResult(value, entry, kv, True)
    # No flow meets the SLO: route by stability capacities so the plan is still well formed.
    caps = {k: (1.0 / ctx.prefill_model(prefill[k[0]].stages).mean_service_s) if math.isfinite(v) else 0.0
            for k, v in spt.items()}
    cost = {k: (v if math.isfinite(v) else 0.0) for k, v in cost.items()}
    dcaps = [ctx.decode_model(d.stages).guess_capacity_rps() for d in decode]
    ccaps = [ctx.colocated_model(g.stages).guess_capacity_rps() for g in colocated]
    value, entry, kv = _solve(prefill, decode, colocated, caps, cost, dcaps, ccaps)
    if value <= 0:
        raise PlanError("routing: no group can serve requests (prefill groups need a decode group reachable "
                        "over a non-zero-bandwidth link)")
    return LpResult(0.0, entry, kv, False)
