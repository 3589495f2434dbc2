"""Per-group analytic queueing models behind the SLO estimate (the formulas are in `scheduler.estimate`).

One model per phase plus one per KV link, each built once from a group's `GroupPerf` and the workload's
length sample, then evaluated at any arrival rate in microseconds (numpy over the sample and a batch-size
grid): `PrefillModel` (M/G/1 with batching and pipelined stages), `EdgeModel` (processor-sharing KV link),
`DecodeModel` (continuous batching, Little's law, M/G/∞ batch-size spread), `ColocatedModel` (chunked
prefill mixed into decode steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from thunderserve.costmodel.comm import SEND_LATENCY_S
from thunderserve.costmodel.perf import GroupPerf
from thunderserve.policy.batching import (
    DEFAULT_CHUNK_TOKEN_BUDGET,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_PREFILL_TOKEN_BUDGET,
)
from thunderserve.scheduler.perfvec import decode_step_s, mixed_step_s, prefill_times_s
from thunderserve.scheduler.samples import LengthSample

_EPS = 1e-12


# ---------------------------------------------------------------- queue formulas


def mg1(rate_rps: float, mean_s: float, second_moment_s2: float, arrival_scv: float = 1.0) -> tuple[float, float]:
    """(utilisation ρ, mean wait of a request that waits at all) of a G/G/1 FIFO queue.

    Pollaczek-Khinchine for Poisson arrivals: E[W] = λE[S²] / (2(1-ρ)); with arrivals of squared coefficient
    of variation c_a² (smoother than Poisson when < 1: a round-robin share of a Poisson stream), Kingman's
    correction E[W] x (c_a² + c_s²)/(1 + c_s²). P(W > 0) is taken as ρ, so a waiting request waits E[W]/ρ on
    average. Returns (ρ, inf) when ρ >= 1 (unstable).
    """
    rho = rate_rps * mean_s
    if rho >= 1.0:
        return rho, float("inf")
    if mean_s <= 0:
        return 0.0, 0.0
    busy = second_moment_s2 / (2.0 * mean_s * (1.0 - rho))
    if arrival_scv != 1.0:
        cs2 = max(second_moment_s2 / (mean_s * mean_s) - 1.0, 0.0)
        busy *= (arrival_scv + cs2) / (1.0 + cs2)
    return rho, busy


def split_scv(share: float, scv: float = 1.0) -> float:
    """c² of the stream a target gets from smooth weighted round-robin (`policy.routing.WeightedChooser`)
    over a stream of squared coefficient of variation `scv`: every ~1/share-th item, so gaps add up ~1/share
    inter-arrival times and c² shrinks by the share."""
    return max(min(share, 1.0), 0.0) * scv


def departure_scv(rho: float, service_scv: float, arrival_scv: float) -> float:
    """Whitt's approximation of the departures' c² of a single-server queue: ρ²c_s² + (1 - ρ²)c_a²."""
    r = min(max(rho, 0.0), 1.0)
    return r * r * service_scv + (1.0 - r * r) * arrival_scv


def admission_wait(rate_rps: float, mean_hold_s: float, slots: float, arrival_scv: float = 1.0
                   ) -> tuple[float, float]:
    """(P(wait), mean wait of a waiting request) to get one of `slots` reservations (KV memory / batch
    slots), each held `mean_hold_s` on average: M/M/c with c = floor(slots), Erlang C, the wait scaled by
    (c_a² + 1)/2 for non-Poisson arrivals (Allen-Cunneen); (1, inf) if overloaded. Models head-of-line
    blocking when a group's KV memory fits only a few requests."""
    c = int(max(math.floor(slots), 0))
    a = rate_rps * mean_hold_s
    if a <= 0:
        return 0.0, 0.0
    if c < 1 or a >= c:
        return 1.0, float("inf")
    b = 1.0  # Erlang B by recursion, then C
    for k in range(1, c + 1):
        b = a * b / (k + a * b)
    p_wait = c * b / (c - a * (1.0 - b))
    return float(min(max(p_wait, 0.0), 1.0)), mean_hold_s / (c - a) * (arrival_scv + 1.0) / 2.0


def wait_exceeds(t_s: np.ndarray, rho: float, busy_mean_s: float) -> np.ndarray:
    """P(W > t): an atom 1-ρ at zero and an exponential tail of mean `busy_mean_s` (exact for M/M/1)."""
    t = np.asarray(t_s, dtype=float)
    if rho >= 1.0 or not np.isfinite(busy_mean_s):
        return np.ones_like(t)
    if rho <= 0 or busy_mean_s <= 0:
        return np.where(t < 0, 1.0, 0.0)
    return np.where(t < 0, 1.0, rho * np.exp(-np.maximum(t, 0.0) / busy_mean_s))


def two_waits_exceed(t_s: np.ndarray, rho1: float, m1: float, rho2: float, m2: float) -> np.ndarray:
    """P(W1 + W2 > t) for two independent waits of the `wait_exceeds` form (closed form, hypoexponential)."""
    t = np.asarray(t_s, dtype=float)
    if rho2 <= 0 or m2 <= 0:
        return wait_exceeds(t, rho1, m1)
    if rho1 <= 0 or m1 <= 0:
        return wait_exceeds(t, rho2, m2)
    if rho1 >= 1 or rho2 >= 1 or not (np.isfinite(m1) and np.isfinite(m2)):
        return np.ones_like(t)
    tt = np.maximum(t, 0.0)
    e1, e2 = np.exp(-tt / m1), np.exp(-tt / m2)
    if abs(m1 - m2) <= 1e-9 * max(m1, m2):
        both = (1.0 + tt / m1) * e1
    else:
        both = (m1 * e1 - m2 * e2) / (m1 - m2)
    tail = rho1 * (1 - rho2) * e1 + rho2 * (1 - rho1) * e2 + rho1 * rho2 * both
    return np.where(t < 0, 1.0, tail)


def occupancy_variance_factor(steps: np.ndarray, mean_steps: float) -> np.ndarray:
    """Variance reduction of the batch size averaged over a request's life (x = its steps / mean steps).

    The number of running sequences of continuous batching under Poisson arrivals is an M/G/∞ occupancy:
    Poisson(N) with autocovariance ≈ N·exp(-t/D). Averaged over a window of x·D it has variance
    N · 2(x - 1 + e^-x)/x² (→ N for short requests, ≈ 2N/x for long ones).
    """
    x = np.maximum(np.asarray(steps, dtype=float) / max(mean_steps, _EPS), 1e-6)
    return np.clip(2.0 * (x - 1.0 + np.exp(-x)) / (x * x), 1e-6, 1.0)


def first_crossing(h: np.ndarray) -> float:
    """Smallest continuous index where `h` (sampled on 0, 1, 2, ...) drops to <= 0; inf if it never does."""
    below = np.flatnonzero(h <= 0)
    if below.size == 0:
        return float("inf")
    k = int(below[0])
    if k == 0:
        return 0.0
    a, b = float(h[k - 1]), float(h[k])
    return (k - 1) + a / (a - b) if a != b else float(k)


def last_below(values: np.ndarray, limit: float) -> float:
    """Largest continuous index i with values(i) <= limit for an increasing array; -inf if none."""
    ok = np.flatnonzero(values <= limit)
    if ok.size == 0:
        return float("-inf")
    k = int(ok[-1])
    if k + 1 >= values.size:
        return float(k)
    a, b = float(values[k]), float(values[k + 1])
    return k + ((limit - a) / (b - a) if b > a else 0.0)


def interp(grid: np.ndarray, x: float) -> float:
    return float(np.interp(x, np.arange(grid.size, dtype=float), grid))


def max_rate(attainment: Callable[[float], float], target: float, guess_rps: float,
             rel_tol: float = 1e-3) -> float:
    """Largest rate whose `attainment(rate)` >= target, by doubling then bisection (attainment decreases
    with the rate). 0 when even a vanishing rate misses the target."""
    guess = guess_rps if np.isfinite(guess_rps) and guess_rps > 0 else 1.0
    if attainment(guess * 1e-6) < target:
        return 0.0
    lo, hi = 0.0, guess
    for _ in range(60):
        if attainment(hi) < target:
            break
        lo, hi = hi, hi * 2.0
    else:
        return hi
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        if attainment(mid) >= target:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------- prefill and KV link


@dataclass(frozen=True)
class PrefillModel:
    """A prefill group as an M/G/1 server over the sampled prompts (batched, pipelined)."""

    prompt_tokens: np.ndarray
    latency_alone_s: np.ndarray  # pipeline latency of each prompt prefilled alone
    latency_batch_s: np.ndarray  # ... inside a typical loaded batch (companions up to the token budget)
    service_s: np.ndarray  # server occupancy per prompt: its FLOP share of its loaded batch's bottleneck time
    mean_service_s: float
    second_moment_s2: float
    fits: np.ndarray  # 1.0 where the prompt fits the group's KV memory, else 0.0
    kv_capacity_tokens: int

    @classmethod
    def build(cls, gp: GroupPerf, sample: LengthSample,
              token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET, quantise_s_per_token: float = 0.0) -> PrefillModel:
        """`quantise_s_per_token`: KV compression's GPU time after the pass (occupies the server, not the
        TTFT: the first token leaves before it; `costmodel.kv.codec_seconds_per_token`)."""
        p = sample.prompt_tokens
        pbar = sample.mean_prompt_tokens
        companions = np.minimum(np.maximum(token_budget - p, 0.0), 2.0 * pbar)
        tokens = p + companions
        sum_sq = p * p + companions * sample.token_weighted_prompt_tokens
        seqs = 1.0 + companions / max(pbar, 1.0)
        alone, _ = prefill_times_s(gp, p, p * p, 1.0)
        batch_latency, batch_bottleneck = prefill_times_s(gp, tokens, sum_sq, seqs)
        lin = sum(s.linear_flops_per_token for s in gp.stages)
        attn = sum(s.attn_prefill_flops_per_sq_token for s in gp.stages)
        head = sum(s.lm_head_flops_per_seq for s in gp.stages)
        share = (p * lin + p * p * attn + head) / (tokens * lin + sum_sq * attn + seqs * head)
        service = batch_bottleneck * share + quantise_s_per_token * p
        return cls(p, alone, batch_latency, service, float(service.mean()), float((service ** 2).mean()),
                   (p <= gp.kv_capacity_tokens).astype(float), gp.kv_capacity_tokens)

    def guess_capacity_rps(self) -> float:
        return 1.0 / max(self.mean_service_s, _EPS)

    def latency_s(self, rate_rps: float) -> np.ndarray:
        """Prefill latency at this load: alone when idle, with batch companions as the server saturates."""
        rho = min(rate_rps * self.mean_service_s, 1.0)
        return self.latency_alone_s + rho * (self.latency_batch_s - self.latency_alone_s)

    @property
    def service_scv(self) -> float:
        return max(self.second_moment_s2 / max(self.mean_service_s, _EPS) ** 2 - 1.0, 0.0)

    def ttft_ok(self, rate_rps: float, ttft_s: float, arrival_scv: float = 1.0) -> np.ndarray:
        """P(TTFT <= target) per sampled request: TTFT = queue wait + prefill latency."""
        rho, m = mg1(rate_rps, self.mean_service_s, self.second_moment_s2, arrival_scv)
        return self.fits * (1.0 - wait_exceeds(ttft_s - self.latency_s(rate_rps), rho, m))

    def kv_hold_ok(self, rate_rps: float, holds: list[tuple[float, np.ndarray]]) -> float:
        """P(the group's KV memory is not the bottleneck): each prompt's KV is held from its batch's start
        until its transfer ends (pull model). Tokens held ~ compound Poisson with mean Σ λ_e·E[p·hold] and
        variance Σ λ_e·E[p²·hold]; `holds` = (share of this group's requests, per-sample extra hold after
        prefill: link sojourn) per KV destination."""
        if rate_rps <= 0:
            return 1.0
        lat = self.latency_s(rate_rps)
        mean = var = 0.0
        for share, extra in holds:
            hold = lat + extra
            if not np.all(np.isfinite(hold)):
                return 0.0
            mean += rate_rps * share * float((self.prompt_tokens * hold).mean())
            var += rate_rps * share * float((self.prompt_tokens ** 2 * hold).mean())
        if var <= 0:
            return 1.0
        return float(ndtr((self.kv_capacity_tokens - mean) / np.sqrt(var)))


@dataclass(frozen=True)
class EdgeModel:
    """KV transfers from one prefill group to one decode group over a processor-sharing link."""

    seconds_per_token: float  # from costmodel.kv_seconds_per_token (compression applied)
    transfer_s: np.ndarray  # per sampled prompt, at full link speed
    mean_s: float

    @classmethod
    def build(cls, seconds_per_token: float, sample: LengthSample) -> EdgeModel:
        if not np.isfinite(seconds_per_token):
            return cls(seconds_per_token, np.full(sample.size, np.inf), float("inf"))
        if seconds_per_token <= 0:
            return cls(0.0, np.zeros(sample.size), 0.0)
        t = SEND_LATENCY_S + sample.prompt_tokens * seconds_per_token
        return cls(seconds_per_token, t, float(t.mean()))

    @property
    def usable(self) -> bool:
        return bool(np.isfinite(self.mean_s))

    def sojourn_s(self, rate_rps: float) -> np.ndarray:
        """M/G/1 processor sharing: a transfer of size K takes K/(1-ρ) on average, ρ = rate·E[K]."""
        rho = rate_rps * self.mean_s
        if rho >= 1.0:
            return np.full(self.transfer_s.size, np.inf)
        return self.transfer_s / (1.0 - rho)


# ---------------------------------------------------------------- decode


@dataclass(frozen=True)
class DecodeModel:
    """Continuous decode batching over the sampled requests."""

    step_s: np.ndarray  # decode step time at batch N = 0..max_batch (N=0 priced as 1), PP micro-batched
    mean_steps: float  # E[m], decode steps per request (m = o - 1)
    steps: np.ndarray  # m_i
    reserve_mean_tokens: float  # time-weighted mean KV a running sequence holds (paged, tokens)
    max_batch: int
    fits: np.ndarray  # 1.0 where prompt + output fits the group's KV memory
    var_factor: np.ndarray  # occupancy_variance_factor per sampled request
    has_decode: np.ndarray  # True where the request has decode steps (o > 1)
    kv_capacity_tokens: int
    tpot_target_s: float

    @classmethod
    def build(cls, gp: GroupPerf, sample: LengthSample, tpot_s: float,
              max_batch: int = DEFAULT_MAX_BATCH_SIZE) -> DecodeModel:
        n = np.maximum(np.arange(max_batch + 1, dtype=float), 1.0)
        step = np.maximum.accumulate(decode_step_s(gp, n, n * sample.decode_context_tokens))
        cap = gp.kv_capacity_tokens
        return cls(step, sample.mean_decode_steps, sample.decode_steps, sample.decode_held_tokens, max_batch,
                   (sample.reserve_tokens <= cap).astype(float),
                   occupancy_variance_factor(sample.decode_steps, sample.mean_decode_steps),
                   sample.decode_steps > 0, cap, tpot_s)

    @property
    def n_cap(self) -> float:
        """Most sequences holding a reservation at once: batch limit and KV memory."""
        return float(min(self.max_batch, self.kv_capacity_tokens / max(self.reserve_mean_tokens, 1.0)))

    def guess_capacity_rps(self) -> float:
        n_t = last_below(self.step_s, self.tpot_target_s)
        n = max(min(self.n_cap, n_t if np.isfinite(n_t) else 1.0), 1.0)
        return n / max(self.mean_steps * interp(self.step_s, n), _EPS)

    def mean_batch(self, rate_rps: float) -> float:
        """Little's law fixed point N = rate · E[m] · τ(N) (smallest root; inf when unstable)."""
        if rate_rps <= 0 or self.mean_steps <= 0:
            return 0.0
        n = np.arange(self.step_s.size, dtype=float)
        return first_crossing(rate_rps * self.mean_steps * self.step_s - n)

    def tpot_s(self, rate_rps: float) -> float:
        nbar = self.mean_batch(rate_rps)
        return interp(self.step_s, max(nbar, 1.0)) if np.isfinite(nbar) else float("inf")

    def admission(self, rate_rps: float, mean_delay_s: float = 0.0, arrival_scv: float = 1.0
                  ) -> tuple[float, float]:
        """(P(wait), mean wait when waiting) for a KV reservation and a batch slot (Erlang C over N_cap
        slots, each held for the link sojourn plus the decode steps)."""
        return self._admission(rate_rps, self.mean_batch(rate_rps), mean_delay_s, arrival_scv)

    def _admission(self, rate_rps: float, nbar: float, mean_delay_s: float, arrival_scv: float
                   ) -> tuple[float, float]:
        if not np.isfinite(nbar):
            return 1.0, float("inf")
        tau = interp(self.step_s, max(nbar, 1.0))
        decoding = self.decoding_fraction
        hold = mean_delay_s + self.mean_steps * tau / max(decoding, _EPS)
        return admission_wait(rate_rps * decoding, hold, self.n_cap, arrival_scv)

    @property
    def decoding_fraction(self) -> float:
        """Fraction of requests with decode steps (o > 1); the others end at their prefill."""
        return float(np.count_nonzero(self.has_decode)) / max(self.has_decode.size, 1)

    def ok(self, rate_rps: float, delay_s: np.ndarray | float = 0.0, mean_delay_s: float = 0.0,
           arrival_scv: float = 1.0) -> np.ndarray:
        """P(mean TPOT <= target) per sampled request arriving over one KV link.

        TPOT_i = τ(N) + (admission wait + delay_i + τ/2)/m_i: admission (a KV reservation and a batch slot,
        Erlang C over N_cap slots held for link sojourn + decoding), `delay_i` (the KV link's sojourn) and
        the wait to join the next step all come after the first token. The running batch N fluctuates
        (M/G/∞ spread around Little's law). `mean_delay_s`: mean link sojourn over this group's requests.
        """
        nbar = self.mean_batch(rate_rps)
        if not np.isfinite(nbar):
            return np.zeros(self.steps.size)
        tau = interp(self.step_s, max(nbar, 1.0))
        delay = np.broadcast_to(np.asarray(delay_s, dtype=float), self.steps.shape)
        m = np.maximum(self.steps, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            budget = self.tpot_target_s - (delay + 0.5 * tau) / m
        n_grid = np.arange(self.step_s.size, dtype=float)
        n_t = np.interp(budget, self.step_s[1:], n_grid[1:], left=-np.inf, right=float(self.max_batch))
        n_t = np.where(budget >= self.step_s[1], np.maximum(n_t, 1.0), -np.inf)
        p_wait, wait_mean = self._admission(rate_rps, nbar, mean_delay_s, arrival_scv)
        with np.errstate(invalid="ignore"):
            slack = m * (self.tpot_target_s - tau) - delay - 0.5 * tau
        admitted = 1.0 - wait_exceeds(slack, p_wait, wait_mean)
        return self.fits * np.where(self.has_decode, admitted, 1.0) * _batch_ok(
            nbar, n_t, self.var_factor * arrival_scv, self.has_decode)


def _batch_ok(nbar: float, limit: np.ndarray | float, var_factor: np.ndarray, has_decode: np.ndarray
              ) -> np.ndarray:
    lim = np.broadcast_to(np.asarray(limit, dtype=float), var_factor.shape)
    if nbar <= 0:
        return np.where(has_decode, (lim > -np.inf).astype(float), 1.0)
    with np.errstate(invalid="ignore"):
        z = (lim - nbar) / np.sqrt(var_factor * nbar)
    return np.where(has_decode, ndtr(z), 1.0)


# ---------------------------------------------------------------- colocated (chunked prefill)


@dataclass(frozen=True)
class ColocatedModel:
    """Prefill chunks mixed into decode steps (vLLM chunked prefill) on one group."""

    decode_only_step_s: np.ndarray  # step with N decodes and no prefill, N = 0..max_batch
    full_step_s: np.ndarray  # step with N decodes plus a full prefill chunk (budget - N tokens)
    chunk_tokens: np.ndarray  # prefill tokens a full step carries at N
    prompt_tokens: np.ndarray
    mean_prompt_tokens: float
    mean_sq_prompt_tokens: float
    mean_steps: float
    steps: np.ndarray
    reserve_mean_tokens: float
    max_batch: int
    fits: np.ndarray
    var_factor: np.ndarray
    has_decode: np.ndarray
    kv_capacity_tokens: int

    @staticmethod
    def prefix_per_step(sample: LengthSample, max_batch: int = DEFAULT_MAX_BATCH_SIZE,
                        chunk_budget: int = DEFAULT_CHUNK_TOKEN_BUDGET) -> np.ndarray:
        """Prefix KV tokens a full chunked step reads, per decode batch N (depends on the workload only).

        A prompt of p tokens cut into chunks of c: Σ(c² + 2c·done) = p² and Σ done = p(p - c)/2c; a full step
        carries c/E[p] prompts' worth of chunks, so per step attention Σlen² ≈ c·E[p²]/E[p] and prefix tokens
        read ≈ E[p·max(p - c, 0)]/(2E[p]).
        """
        chunk = np.maximum(chunk_budget - np.arange(max_batch + 1, dtype=float), 1.0)
        p = sample.prompt_tokens
        return (p[None, :] * np.maximum(p[None, :] - chunk[:, None], 0.0)).mean(axis=1) / (
            2.0 * max(sample.mean_prompt_tokens, 1.0))

    @classmethod
    def build(cls, gp: GroupPerf, sample: LengthSample, max_batch: int = DEFAULT_MAX_BATCH_SIZE,
              chunk_budget: int = DEFAULT_CHUNK_TOKEN_BUDGET, prefix_per_step: np.ndarray | None = None
              ) -> ColocatedModel:
        n = np.arange(max_batch + 1, dtype=float)
        nn = np.maximum(n, 1.0)
        ctx = sample.decode_context_tokens
        chunk = np.maximum(chunk_budget - n, 1.0)
        p = sample.prompt_tokens
        pbar = max(sample.mean_prompt_tokens, 1.0)
        if prefix_per_step is None:
            prefix_per_step = cls.prefix_per_step(sample, max_batch, chunk_budget)
        dec = np.maximum.accumulate(decode_step_s(gp, nn, nn * ctx))
        full = mixed_step_s(gp, n, n * ctx, chunk, chunk * sample.token_weighted_prompt_tokens,
                            prefix_per_step, chunk / pbar, 1.0 + chunk / pbar)
        cap = gp.kv_capacity_tokens
        return cls(dec, full, chunk, p, sample.mean_prompt_tokens, float((p ** 2).mean()),
                   sample.mean_decode_steps, sample.decode_steps, sample.decode_held_tokens, max_batch,
                   (sample.reserve_tokens <= cap).astype(float),
                   occupancy_variance_factor(sample.decode_steps, sample.mean_decode_steps),
                   sample.decode_steps > 0, cap)

    @property
    def n_cap(self) -> float:
        return float(min(self.max_batch, self.kv_capacity_tokens / max(self.reserve_mean_tokens, 1.0)))

    def guess_capacity_rps(self) -> float:
        return float(self.chunk_tokens[0] / max(self.mean_prompt_tokens * self.full_step_s[0], _EPS))

    def _state(self, rate_rps: float) -> tuple[float, np.ndarray, np.ndarray]:
        """(mean decode batch, prefill utilisation per N, TPOT per N) at this rate."""
        util = rate_rps * self.mean_prompt_tokens * self.full_step_s / self.chunk_tokens
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = 1.0 / (np.minimum(util, 1.0) / self.full_step_s + np.maximum(1.0 - util, 0.0) / self.decode_only_step_s)
        n = np.arange(tpot.size, dtype=float)
        h = np.where(util < 1.0, rate_rps * self.mean_steps * tpot - n, np.inf)
        return (first_crossing(h) if rate_rps > 0 else 0.0), util, tpot

    def tpot_s(self, rate_rps: float) -> float:
        nbar, _, tpot = self._state(rate_rps)
        return interp(tpot, max(nbar, 1.0)) if np.isfinite(nbar) else float("inf")

    def ok(self, rate_rps: float, ttft_s: float, tpot_target_s: float, arrival_scv: float = 1.0) -> np.ndarray:
        """P(TTFT and TPOT both met) per sampled request.

        TPOT: decode steps are long (τ_full) while the prefill server is busy and short (τ_dec) while it is
        idle; a request with m steps misses the target when, over the window D = m·target, the busy fraction
        exceeds f* (1/target = f*/τ_full + (1-f*)/τ_dec), i.e. it spends more than f*·D in prefill busy
        periods. Probability: the larger of (a) ρ·P(residual busy period > f*·D), the residual of an M/G/1
        busy period taken exponential with its mean E[S²]/(2E[S](1-ρ)²), and (b) the normal tail of the
        busy fraction of a two-state (busy/idle) process over D: mean ρ, variance
        2ρ(1-ρ)(τc/D)(1 - (τc/D)(1 - e^(-D/τc))), τc = 1/(1/E[busy] + λ) its correlation time.
        """
        nbar, util, tpot = self._state(rate_rps)
        if not np.isfinite(nbar):
            return np.zeros(self.prompt_tokens.size)
        per_token = interp(self.full_step_s / self.chunk_tokens, nbar)
        service = self.prompt_tokens * per_token
        mean_s = self.mean_prompt_tokens * per_token
        rho, m = mg1(rate_rps, mean_s, self.mean_sq_prompt_tokens * per_token ** 2, arrival_scv)
        if not np.isfinite(m):
            return np.zeros(self.prompt_tokens.size)
        hold = rho * m + mean_s + self.mean_steps * interp(tpot, max(nbar, 1.0))
        p_wait, wait_mean = admission_wait(rate_rps, hold, self.n_cap, arrival_scv)
        ttft = 1.0 - two_waits_exceed(ttft_s - service, rho, m, p_wait, wait_mean)
        return self.fits * ttft * (1.0 - self._tpot_miss(rate_rps, nbar, rho, per_token, tpot_target_s, arrival_scv))

    def _tpot_miss(self, rate_rps: float, nbar: float, rho: float, per_token_s: float, target_s: float,
                   arrival_scv: float = 1.0) -> np.ndarray:
        tau_f = interp(self.full_step_s, nbar)
        tau_d = interp(self.decode_only_step_s, max(nbar, 1.0))
        if tau_d > target_s:
            return np.where(self.has_decode, 1.0, 0.0)
        if tau_f <= target_s or rho <= 0:
            return np.zeros(self.prompt_tokens.size)
        f_star = (1.0 / tau_d - 1.0 / target_s) / (1.0 / tau_d - 1.0 / tau_f)
        window = np.maximum(self.steps, 1.0) * target_s
        mean_s = self.mean_prompt_tokens * per_token_s
        busy_mean = mean_s / max(1.0 - rho, _EPS)
        residual_mean = self.mean_sq_prompt_tokens * per_token_s ** 2 / (2.0 * mean_s * max(1.0 - rho, _EPS) ** 2)
        cs2 = max(self.mean_sq_prompt_tokens / self.mean_prompt_tokens ** 2 - 1.0, 0.0)
        smooth = (arrival_scv + cs2) / (1.0 + cs2)  # smoother arrivals: shorter busy periods (Kingman)
        residual_mean *= smooth
        busy_mean *= smooth
        corr = 1.0 / (1.0 / busy_mean + rate_rps)
        x = corr / window
        var = 2.0 * rho * (1.0 - rho) * x * (1.0 - x * (1.0 - np.exp(-1.0 / x)))
        normal = 1.0 - ndtr((f_star - rho) / np.sqrt(np.maximum(var, 1e-18)))
        single = rho * np.exp(-f_star * window / residual_mean)
        return np.where(self.has_decode, np.maximum(single, normal), 0.0)
