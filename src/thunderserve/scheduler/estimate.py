"""Analytic, queueing-aware SLO estimate of a plan: attainment at a rate, and the max rate at the SLO.

Requests arrive as a Poisson process of rate λ and are split by `routing.entry` (and prefill groups' KV by
`routing.kv`), so each group sees a Poisson stream. Lengths are the workload's empirical (prompt p, output o)
pairs (`samples.length_sample`). A request meets the SLO when TTFT <= target and its mean TPOT <= target;
TTFT is measured until the first token is available on the decode side (prefill done + KV transferred),
TPOT = (last token - first token) / (o - 1) over its o - 1 decode steps.

Prefill group (λ_p): M/G/1 FIFO. Service S_i = bottleneck-stage prefill time of prompt p_i (pipelined
stages admit the next batch when the slowest stage frees), latency L_i = the full pipeline time.
Pollaczek-Khinchine: ρ = λE[S], E[W] = λE[S²]/(2(1-ρ)); P(W > t) ≈ ρ·exp(-t·ρ/E[W]) (exact for M/M/1).
Batching under the prefill token budget (policy.batching) packs queued prompts into one pass; prompts are
compute bound, so a batch costs about the sum of its prompts and the per-request service is kept.

KV edge p→d (λ_pd = λ_p·kv share): the (compressed) KV of prompt p_i crosses the slowest stage link in
K_i = 30 µs + p_i·(seconds per token from costmodel.kv_seconds_per_token); transfers queue FIFO on the link
(M/G/1 again). TTFT_i = W_p + L_i + W_pd + K_i; P(W_p + W_pd > t) in closed form (two atoms at zero with
exponential tails -> hypoexponential), so P(TTFT_i <= T) = 1 - P(W_p + W_pd > T - L_i - K_i).
Prompts larger than the prefill group's KV memory never run (P = 0).

Decode group (λ_d = Σ_p λ_pd): continuous batching with KV reserved for p + o tokens per sequence. The
mean batch N solves Little's law N = λ_d·E[o-1]·τ(N), τ(N) = decode step time (costmodel) at batch N and
context N·c̄, c̄ = E[(o-1)(p + o/2)]/E[o-1] (time-weighted mean context). The batch is capped by
N_cap = min(max batch, KV tokens / E[(o-1)(p+o)]/E[o-1]) and by N_T, the batch whose step time equals the
TPOT target. The batch size of an M/G/∞ system is Poisson(N); averaged over a request's life (x = its
steps / mean steps) its variance is N·v(x), v(x) = 2(x-1+e^-x)/x². So P(TPOT_i ok) =
Φ((min(N_T, N_cap) - N)/sqrt(v(x_i)·N)), and 0 when N has no solution (decode unstable) or when
p_i + o_i exceeds the KV memory.

Colocated group (λ_c): vLLM chunked prefill. A step carries the N running decodes plus up to B - N prefill
tokens (B = chunk token budget); its time τ_full(N) prices both in one forward pass, a decode-only step
τ_dec(N). Prefill is an M/G/1 server with S_i = p_i·τ_full/(B - N); the fraction of time spent in prefill
steps is u = λ_c·E[S]; decodes see TPOT(N) = 1/(u/τ_full + (1-u)/τ_dec) and N solves N = λ_c·E[o-1]·TPOT(N).
TTFT_i = W + S_i; TPOT as for decode groups with TPOT(N) in place of τ(N).

Attainment at λ = Σ over entry groups and KV edges of (share × mean over sampled requests of
P(TTFT ok)·P(TPOT ok)), TTFT and TPOT treated as independent. The max rate at the SLO is found by
bisection on λ (attainment falls with λ). One evaluation is a few numpy passes over 512 samples per group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from thunderserve.errors import PlanError
from thunderserve.plan.model import Phase, Plan
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.queueing import max_rate

Q_TTFT = 0.9  # quantile reported as ttft_p90_s


def _require_routing(plan: Plan) -> None:
    if plan.routing is None:
        raise PlanError("routing: missing (solve it with solve_routing or evaluate_plan)")


def _ok_fn(ctx: PlanningContext, plan: Plan, rate_rps: float, ttft_s: float, with_tpot: bool
           ) -> list[tuple[float, np.ndarray]]:
    """(share of all requests, per-sample probability) for every entry group / KV edge."""
    _require_routing(plan)
    assert plan.routing is not None
    groups = {g.id: g for g in plan.groups}
    entry = plan.routing.entry
    kv = plan.routing.kv
    decode_rate: dict[str, float] = {}
    for p, share in entry.items():
        for d, s in kv.get(p, {}).items():
            decode_rate[d] = decode_rate.get(d, 0.0) + rate_rps * share * s
    decode_ok = {d: (ctx.decode_model(groups[d].stages).ok(r) if with_tpot else None)
                 for d, r in sorted(decode_rate.items())}
    parts: list[tuple[float, np.ndarray]] = []
    for gid, share in sorted(entry.items()):
        if share <= 0:
            continue
        g = groups[gid]
        lam = rate_rps * share
        if g.phase is Phase.COLOCATED:
            cm = ctx.colocated_model(g.stages)
            tpot_target = ctx.slo.tpot_s if with_tpot else math.inf
            parts.append((share, cm.ok(lam, ttft_s, tpot_target)))
            continue
        pm = ctx.prefill_model(g.stages)
        for d, s in sorted(kv.get(gid, {}).items()):
            if s <= 0:
                continue
            spt = ctx.seconds_per_token(g.stages, frozenset(groups[d].gpus))
            edge = ctx.edge(spt)
            ok = pm.ttft_ok(lam, ttft_s, edge, lam * s)
            dok = decode_ok[d]
            parts.append((share * s, ok * dok if dok is not None else ok))
    return parts


def attainment(ctx: PlanningContext, plan: Plan, rate_rps: float) -> float:
    """Estimated fraction of requests meeting both SLO targets at `rate_rps` (plan must have routing)."""
    if rate_rps <= 0:
        rate_rps = 1e-9
    parts = _ok_fn(ctx, plan, rate_rps, ctx.slo.ttft_s, True)
    return float(sum(w * float(p.mean()) for w, p in parts))


def max_rate_at_slo(ctx: PlanningContext, plan: Plan, guess_rps: float | None = None) -> float:
    """Largest rate whose estimated attainment meets the SLO's attainment target (bisection)."""
    _require_routing(plan)
    if guess_rps is None or guess_rps <= 0:
        assert plan.routing is not None
        guess_rps = sum(ctx.group_capacity(plan.group(g)) for g in plan.routing.entry) or 1.0
    return max_rate(lambda r: attainment(ctx, plan, r), ctx.slo.attainment_target, guess_rps)


def ttft_quantile_s(ctx: PlanningContext, plan: Plan, rate_rps: float, q: float = Q_TTFT) -> float | None:
    """The q-quantile of TTFT at this rate (None when more than 1-q of requests never get a first token)."""
    def cdf(t: float) -> float:
        return float(sum(w * float(p.mean()) for w, p in _ok_fn(ctx, plan, rate_rps, t, False)))

    hi = max(ctx.slo.ttft_s, 1e-3)
    for _ in range(40):
        if cdf(hi) >= q:
            break
        hi *= 2.0
    else:
        return None
    lo = 0.0
    while hi - lo > 1e-4 * hi:
        mid = 0.5 * (lo + hi)
        if cdf(mid) >= q:
            hi = mid
        else:
            lo = mid
    return hi


def tpot_mean_s(ctx: PlanningContext, plan: Plan, rate_rps: float) -> float | None:
    """Request-weighted mean TPOT over decode/colocated groups at this rate (None when one is unstable)."""
    assert plan.routing is not None
    groups = {g.id: g for g in plan.groups}
    total = 0.0
    weight = 0.0
    for gid, share in sorted(plan.routing.entry.items()):
        g = groups[gid]
        if g.phase is Phase.COLOCATED:
            pairs = [(share, ctx.colocated_model(g.stages).tpot_s(rate_rps * share))]
        else:
            pairs = []
            for d, s in sorted(plan.routing.kv.get(gid, {}).items()):
                lam_d = sum(rate_rps * e * plan.routing.kv.get(p, {}).get(d, 0.0)
                            for p, e in plan.routing.entry.items())
                pairs.append((share * s, ctx.decode_model(groups[d].stages).tpot_s(lam_d)))
        for w, t in pairs:
            if not math.isfinite(t):
                return None
            total += w * t
            weight += w
    return total / weight if weight > 0 else None


def plan_cost_per_hour(ctx: PlanningContext, plan: Plan) -> float:
    return float(sum(ctx.cluster.by_id[g].price_usd_per_hour for g in plan.gpus))


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def plan_estimate(ctx: PlanningContext, plan: Plan, rate_rps: float | None = None,
                  max_rate_rps: float | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The `plan.estimate` dict (JSON-safe): max rate, attainment and latencies at `rate_rps` (default: the
    max rate), cost. Latencies are None when the plan cannot serve that rate at all."""
    mr = max_rate_at_slo(ctx, plan) if max_rate_rps is None else max_rate_rps
    at = rate_rps if rate_rps is not None else mr
    cost = plan_cost_per_hour(ctx, plan)
    est: dict[str, Any] = {
        "max_rate_at_slo": float(mr),
        "rate_rps": float(at),
        "slo_attainment": float(attainment(ctx, plan, at)) if at > 0 else 1.0,
        "cost_per_hour": cost,
        "rate_per_dollar": float(mr / cost) if cost > 0 else 0.0,
        "ttft_p90_s": _num(ttft_quantile_s(ctx, plan, at)) if at > 0 else None,
        "tpot_mean_s": _num(tpot_mean_s(ctx, plan, at)) if at > 0 else None,
        "ttft_target_s": ctx.slo.ttft_s,
        "tpot_target_s": ctx.slo.tpot_s,
        "attainment_target": ctx.slo.attainment_target,
        "workload": ctx.workload.name,
    }
    if extra:
        est.update(extra)
    return est
