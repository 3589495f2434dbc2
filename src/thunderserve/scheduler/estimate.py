"""Analytic, queueing-aware SLO estimate of a plan: attainment at a rate, and the max rate at the SLO.

It models the mechanisms the simulator replays (`sim.replay`, `policy.step`). Requests arrive as a Poisson
process of rate λ and are split by `routing.entry` (and prefill groups' KV by `routing.kv`, smooth weighted
round-robin), so each group sees a Poisson stream. Lengths are the workload's empirical (prompt p, output o)
pairs (`samples.length_sample`). A request meets the SLO when TTFT <= target and its mean TPOT <= target;
TTFT ends at the first token (end of its prefill), TPOT = (finish - first token) / (o - 1), so the KV
transfer and the wait to join a decode batch count in TPOT. Requests with o = 1 end at prefill.

Prefill group (λ_p): M/G/1 FIFO. Prompts are batched under the prefill token budget (policy.batching) and
batches flow through pipelined stages, the next one entering after the bottleneck-stage time. A request's
server occupancy S_i is its FLOP share of the bottleneck time of a loaded batch (its prompt plus up to two
mean prompts within the budget); Pollaczek-Khinchine: ρ = λE[S], E[W] = λE[S²]/(2(1-ρ)), and
P(W > t) ≈ ρ·exp(-t·ρ/E[W]) (exact for M/M/1). TTFT_i = W + L_i with L_i its pipeline latency, alone when
idle and inside the loaded batch as ρ -> 1 (linear in ρ). The prompt's KV stays in the prefill group until
its transfer ends (pull model), i.e. through the decode group's admission wait and the link sojourn: tokens
held ~ compound Poisson, mean λ·E[p·hold] and variance λ·E[p²·hold]; the group is not blocked with
probability Φ((KV tokens - mean)/sd), which multiplies the TTFT probability. Prompts larger than the group's KV memory never run (P = 0).

KV link p→d (λ_pd = λ_p·share): the (compressed) KV of prompt p_i needs K_i = 30 µs + p_i·(seconds per token
from costmodel.kv_seconds_per_token) at full speed. Transfers share the network's resources (NICs, zone paths,
links, a node's bus; `costmodel.network`): each resource r has utilisation ρ_r = Σ over links crossing it of
λ_pd·E[p]·(bytes per token on r) / capacity, and a transfer takes K_i times the slowdown of the busiest
resource it crosses (processor sharing there, `contention_slowdown`); a saturated resource makes the links
crossing it unusable. Compressed KV adds the prefill GPUs' quantise and the decode GPUs' dequantise time
(`costmodel.kv.codec_seconds_per_token`) to the sojourn; the quantise also occupies the prefill server (its
service time); the dequantise's share of the decode GPUs' time (λ_d·E[p]·seconds per token, ~1-2% at
typical rates) is not taken from the decode group's steps.

Decode group (λ_d = Σ_p λ_pd): continuous batching; KV memory is paged as the simulator pages it
(`policy.kv_blocks`): a sequence holds its context in 16-token blocks, admitted by its prompt's blocks. The mean running batch N solves Little's law N = λ_d·E[o-1]·τ(N), τ(N) =
decode step time at batch N and context N·c̄ (c̄ = E[(o-1)(p + o/2)]/E[o-1], the time-weighted mean context;
with PP the batch runs as min(pp, N) micro-batches: τ = max(pipeline latency, m·bottleneck)). A request's
TPOT_i = τ(N) + (transfer sojourn_i + τ/2)/(o_i - 1), so it meets the target while N <= N_T,i (the batch at
which that holds). Slots and KV memory cap the sequences holding a reservation: N + N_transfer <= N_cap =
min(max batch, KV tokens / (c̄ + half a block)), the memory a decoding sequence holds on average (expected
values of the workload: no request's output length is read; preemptions, which the simulator replays when
memory runs out, are not modelled beyond this cap). The running batch of an M/G/∞ system is
Poisson(N); averaged over a request's life (x = its steps / mean steps) its variance is N·v(x),
v(x) = 2(x-1+e^-x)/x². So P(TPOT_i ok) = Φ((min(N_T,i, N_cap - N_transfer) - N)/sqrt(v(x_i)·N)), and 0
when N has no solution (decode unstable) or when p_i + o_i exceeds the KV memory.

Colocated group (λ_c): vLLM chunked prefill. A step carries the N running decodes plus up to B - N prefill
tokens (B = chunk token budget) in one forward pass, τ_full(N); a decode-only step takes τ_dec(N). Prefill is
an M/G/1 server with S_i = p_i·τ_full/(B - N); the fraction of time spent in prefill steps is u = λ_c·E[S];
decodes see TPOT(N) = 1/(u/τ_full + (1-u)/τ_dec) and N solves N = λ_c·E[o-1]·TPOT(N). TTFT_i = W + S_i;
TPOT as for decode groups with TPOT(N) in place of τ(N) (requests being prefilled also hold reservations).

Arrival variability: routing is smooth weighted round-robin (`policy.routing`), so a group with share s of a
Poisson stream sees gaps of ~1/s inter-arrival times, c_a² ≈ s; a prefill group's departures have
c_d² ≈ ρ²c_s² + (1-ρ²)c_a² (Whitt) and a decode group's arrivals are the rate-weighted shares of those. Queue
waits use Kingman's factor (c_a² + c_s²)/(1 + c_s²) on the Pollaczek-Khinchine wait, admission waits
(c_a² + 1)/2 (Allen-Cunneen), the running-batch spread scales by c_a², and chunked-prefill busy periods
shrink like the waits. Capacities for the routing LP assume Poisson arrivals (c_a² = 1, conservative).

Attainment at λ = Σ over entry groups and KV links of (share × mean over sampled requests of
P(TTFT ok)·P(TPOT ok)), TTFT and TPOT treated as independent. The max rate at the SLO is found by
bisection on λ (attainment falls with λ). One evaluation is a few numpy passes over 512 samples per group.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from thunderserve.costmodel.network import contention_slowdown
from thunderserve.errors import PlanError
from thunderserve.plan.model import Phase, Plan
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.queueing import departure_scv, max_rate, split_scv

Q_TTFT = 0.9  # quantile reported as ttft_p90_s
VANISHING_RATE_RPS = 1e-6  # "no load", for describing a plan whose max rate at the SLO is 0


def _require_routing(plan: Plan) -> None:
    if plan.routing is None:
        raise PlanError("routing: missing (solve it with solve_routing or evaluate_plan)")


def _ok_fn(ctx: PlanningContext, plan: Plan, rate_rps: float, ttft_s: float, with_tpot: bool
           ) -> list[tuple[float, np.ndarray]]:
    """(share of all requests, per-sample probability) for every entry group / KV link."""
    _require_routing(plan)
    assert plan.routing is not None
    groups = {g.id: g for g in plan.groups}
    entry = plan.routing.entry
    kv = plan.routing.kv
    # per KV link: rate and per-sample sojourn; per decode group: total rate, mean link sojourn and the c² of
    # its arrivals (round-robin shares of prefill departures); entry streams are shares of a Poisson stream
    links: dict[tuple[str, str], tuple[float, np.ndarray]] = {}
    decode_rate: dict[str, float] = {}
    in_transfer: dict[str, float] = {}
    decode_scv: dict[str, float] = {}
    sample = ctx.sample
    has = sample.decode_steps > 0
    slowdown = _network_slowdowns(ctx, plan, rate_rps)
    for p, share in sorted(entry.items()):
        if groups[p].phase is not Phase.PREFILL:
            continue
        pm = ctx.prefill_model(groups[p].stages)
        lam_p = rate_rps * share
        out_scv = departure_scv(lam_p * pm.mean_service_s, pm.service_scv, split_scv(share))
        for d, s in sorted(kv.get(p, {}).items()):
            lam = lam_p * s
            edge = ctx.edge(ctx.seconds_per_token(groups[p].stages, groups[d].stages))
            codec = ctx.codec_s_per_token(groups[p].stages) + ctx.codec_s_per_token(groups[d].stages)
            soj = edge.transfer_s * slowdown.get((p, d), 1.0) + codec * sample.prompt_tokens
            links[(p, d)] = (lam, soj)
            decode_rate[d] = decode_rate.get(d, 0.0) + lam
            moved = float(soj[has].mean()) if has.any() else 0.0
            in_transfer[d] = in_transfer.get(d, 0.0) + lam * moved  # rate-weighted, normalised below
            decode_scv[d] = decode_scv.get(d, 0.0) + lam * split_scv(s, out_scv)
    # a prefill group holds a prompt's KV until its transfer ends, which starts once the decode group
    # admits the request: the admission wait lengthens the hold
    admit_wait: dict[str, float] = {}
    for d, lam_d in sorted(decode_rate.items()):
        dm = ctx.decode_model(groups[d].stages)
        p_wait, wait_mean = dm.admission(lam_d, in_transfer[d] / lam_d if lam_d > 0 else 0.0,
                                         decode_scv[d] / lam_d if lam_d > 0 else 1.0)
        admit_wait[d] = p_wait * wait_mean if p_wait > 0 else 0.0
    parts: list[tuple[float, np.ndarray]] = []
    for gid, share in sorted(entry.items()):
        if share <= 0:
            continue
        g = groups[gid]
        lam = rate_rps * share
        if g.phase is Phase.COLOCATED:
            cm = ctx.colocated_model(g.stages)
            tpot_target = ctx.slo.tpot_s if with_tpot else math.inf
            parts.append((share, cm.ok(lam, ttft_s, tpot_target, split_scv(share))))
            continue
        pm = ctx.prefill_model(g.stages)
        dests = sorted((d, s) for d, s in kv.get(gid, {}).items() if s > 0)
        hold = pm.kv_hold_ok(lam, [(s, links[(gid, d)][1] + admit_wait[d]) for d, s in dests])
        ttft = pm.ttft_ok(lam, ttft_s, split_scv(share)) * hold
        for d, s in dests:
            if with_tpot:
                dm = ctx.decode_model(groups[d].stages)
                lam_d = decode_rate[d]
                mean_delay = in_transfer[d] / lam_d if lam_d > 0 else 0.0
                scv = decode_scv[d] / lam_d if lam_d > 0 else 1.0
                ok = ttft * dm.ok(lam_d, links[(gid, d)][1], mean_delay, scv)
            else:
                ok = ttft
            parts.append((share * s, ok))
    return parts


def _network_slowdowns(ctx: PlanningContext, plan: Plan, rate_rps: float) -> dict[tuple[str, str], float]:
    """Per KV link (prefill, decode): how much the network's shared resources stretch its transfers at this
    rate (see the module docstring; 1.0 on an idle network, inf when a resource it crosses is saturated)."""
    assert plan.routing is not None
    groups = {g.id: g for g in plan.groups}
    mean_prompt = ctx.sample.mean_prompt_tokens
    load: dict[str, float] = {}
    paths = {}
    for p, share in sorted(plan.routing.entry.items()):
        if groups[p].phase is not Phase.PREFILL:
            continue
        for d, s in sorted(plan.routing.kv.get(p, {}).items()):
            lam = rate_rps * share * s
            ps = paths[(p, d)] = ctx.kv_paths(groups[p].stages, groups[d].stages)
            for path in ps:
                for r in path.resources:
                    load[r] = load.get(r, 0.0) + lam * mean_prompt * path.bytes_per_token
    cap = ctx.topology.capacity_bytes_s
    return {key: contention_slowdown(ps, load, cap) for key, ps in paths.items()}


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
    """Request-weighted mean decode step time over decode/colocated groups at this rate (transfer time
    excluded; None when a group is unstable)."""
    assert plan.routing is not None
    groups = {g.id: g for g in plan.groups}
    entry, kv = plan.routing.entry, plan.routing.kv
    total = 0.0
    weight = 0.0
    for gid, share in sorted(entry.items()):
        g = groups[gid]
        if g.phase is Phase.COLOCATED:
            pairs = [(share, ctx.colocated_model(g.stages).tpot_s(rate_rps * share))]
        else:
            pairs = []
            for d, s in sorted(kv.get(gid, {}).items()):
                lam_d = sum(rate_rps * e * kv.get(p, {}).get(d, 0.0) for p, e in entry.items())
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
    # at the max rate by default; a plan that meets the SLO at no rate is described at a vanishing load
    at = rate_rps if rate_rps is not None else max(mr, VANISHING_RATE_RPS)
    cost = plan_cost_per_hour(ctx, plan)
    est: dict[str, Any] = {
        "max_rate_at_slo": float(mr),
        "rate_rps": float(at),
        "slo_attainment": float(attainment(ctx, plan, at)),
        "cost_per_hour": cost,
        "rate_per_dollar": float(mr / cost) if cost > 0 else 0.0,
        "ttft_p90_s": _num(ttft_quantile_s(ctx, plan, at)),
        "tpot_mean_s": _num(tpot_mean_s(ctx, plan, at)),
        "ttft_target_s": ctx.slo.ttft_s,
        "tpot_target_s": ctx.slo.tpot_s,
        "attainment_target": ctx.slo.attainment_target,
        "workload": ctx.workload.name,
    }
    if extra:
        est.update(extra)
    return est
