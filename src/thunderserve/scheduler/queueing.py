"""Per-group analytic queueing models behind the SLO estimate (formulas in `scheduler.estimate`).

Three models, one per phase, each built once from a group's `GroupPerf` and the workload's length sample
and then evaluated at any arrival rate in microseconds (numpy over the sample and a batch-size grid):

* `PrefillModel`: an M/G/1 FIFO server whose service time is the bottleneck-stage prefill time of the
  request's prompt (pipelined stages let the next batch in when the slowest stage frees up); the request's
  own latency is the full pipeline latency.
* `EdgeModel`: the KV transfer from one prefill group to one decode group, an M/G/1 FIFO queue on the link
  with service = transfer time of the (compressed) prompt KV.
* `DecodeModel`: continuous batching. The mean batch N solves Little's law N = rate · E[m] · τ(N) with τ the
  decode step time at batch N and the time-weighted mean context; N is capped by the batch limit and by the
  KV memory (each running sequence reserves prompt + output tokens).
* `ColocatedModel`: vLLM-style chunked prefill: each step carries the running decodes plus prefill chunks
  up to the chunk token budget; prefill is an M/G/1 server in units of full-chunk steps and the decodes see
  the time-average step duration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from thunderserve.costmodel.comm import SEND_LATENCY_S
from thunderserve.costmodel.perf import GroupPerf
from thunderserve.policy.batching import DEFAULT_CHUNK_TOKEN_BUDGET, DEFAULT_MAX_BATCH_SIZE
from thunderserve.scheduler.perfvec import decode_step_s, mixed_step_time_s, prefill_times_s
from thunderserve.scheduler.samples import LengthSample

_EPS = 1e-12


# ---------------------------------------------------------------- queue formulas


def mg1(rate_rps: float, mean_s: float, second_moment_s2: float) -> tuple[float, float]:
    """(utilisation ρ, mean wait of a request that waits at all) of an M/G/1 FIFO queue.

    Pollaczek-Khinchine: E[W] = λE[S²] / (2(1-ρ)); P(W > 0) = ρ, so the wait of a waiting request has mean
    E[W]/ρ = E[S²] / (2E[S](1-ρ)). Returns (ρ, inf) when ρ >= 1 (unstable).
    """
    rho = rate_rps * mean_s
    if rho >= 1.0:
        return rho, float("inf")
    if mean_s <= 0:
        return 0.0, 0.0
    return rho, second_moment_s2 / (2.0 * mean_s * (1.0 - rho))


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


# ---------------------------------------------------------------- prefill and KV edge


@dataclass(frozen=True)
class PrefillModel:
    """A prefill group as an M/G/1 server over the sampled prompts."""

    latency_s: np.ndarray  # full pipeline prefill latency of each sampled prompt, alone
    service_s: np.ndarray  # server occupancy of each prompt (bottleneck stage time)
    mean_service_s: float
    second_moment_s2: float
    fits: np.ndarray  # 1.0 where the prompt fits the group's KV memory, else 0.0
    kv_capacity_tokens: int

    @classmethod
    def build(cls, gp: GroupPerf, sample: LengthSample) -> PrefillModel:
        p = sample.prompt_tokens
        latency, service = prefill_times_s(gp, p, p * p, 1.0)
        return cls(latency, service, float(service.mean()), float((service ** 2).mean()),
                   (p <= gp.kv_capacity_tokens).astype(float), gp.kv_capacity_tokens)

    def guess_capacity_rps(self) -> float:
        return 1.0 / max(self.mean_service_s, _EPS)

    def ttft_ok(self, rate_rps: float, ttft_s: float, edge: EdgeModel | None = None, edge_rate_rps: float = 0.0
                ) -> np.ndarray:
        """P(TTFT <= target) per sampled request: TTFT = prefill wait + latency (+ transfer wait + transfer)."""
        rho1, m1 = mg1(rate_rps, self.mean_service_s, self.second_moment_s2)
        slack = ttft_s - self.latency_s
        if edge is None:
            return self.fits * (1.0 - wait_exceeds(slack, rho1, m1))
        rho2, m2 = mg1(edge_rate_rps, edge.mean_s, edge.second_moment_s2)
        slack = slack - edge.transfer_s
        return self.fits * (1.0 - two_waits_exceed(slack, rho1, m1, rho2, m2))


@dataclass(frozen=True)
class EdgeModel:
    """KV transfers from one prefill group to one decode group, queued FIFO on their link."""

    seconds_per_token: float  # from costmodel.kv_seconds_per_token (compression applied)
    transfer_s: np.ndarray  # per sampled prompt
    mean_s: float
    second_moment_s2: float

    @classmethod
    def build(cls, seconds_per_token: float, sample: LengthSample) -> EdgeModel:
        if not np.isfinite(seconds_per_token):
            inf = np.full(sample.size, np.inf)
            return cls(seconds_per_token, inf, float("inf"), float("inf"))
        t = np.where(sample.prompt_tokens > 0, SEND_LATENCY_S + sample.prompt_tokens * seconds_per_token, 0.0)
        if seconds_per_token <= 0:
            t = np.zeros(sample.size)
        return cls(seconds_per_token, t, float(t.mean()), float((t ** 2).mean()))

    @property
    def usable(self) -> bool:
        return bool(np.isfinite(self.mean_s))


# ---------------------------------------------------------------- decode


@dataclass(frozen=True)
class DecodeModel:
    """Continuous decode batching over the sampled requests."""

    step_s: np.ndarray  # decode step time at batch N = 0..max_batch (N=0 priced as 1)
    mean_steps: float  # E[m], decode steps per request
    n_cap: float  # most concurrent sequences: min(batch limit, KV capacity / mean reservation)
    n_tpot: float  # largest batch whose step time meets the TPOT target (-inf if none)
    fits: np.ndarray  # 1.0 where prompt + output fits the group's KV memory
    var_factor: np.ndarray  # occupancy_variance_factor per sampled request
    has_decode: np.ndarray  # True where the request has decode steps (o > 1)
    kv_capacity_tokens: int

    @classmethod
    def build(cls, gp: GroupPerf, sample: LengthSample, tpot_s: float,
              max_batch: int = DEFAULT_MAX_BATCH_SIZE) -> DecodeModel:
        n = np.arange(max_batch + 1, dtype=float)
        nn = np.maximum(n, 1.0)
        step = decode_step_s(gp, nn, nn * sample.decode_context_tokens)
        cap = gp.kv_capacity_tokens
        n_cap = float(min(max_batch, cap / max(sample.decode_reserve_tokens, 1.0)))
        n_tpot = last_below(step, tpot_s)
        return cls(step, sample.mean_decode_steps, n_cap, n_tpot,
                   (sample.reserve_tokens <= cap).astype(float),
                   occupancy_variance_factor(sample.decode_steps, sample.mean_decode_steps),
                   sample.decode_steps > 0, cap)

    def guess_capacity_rps(self) -> float:
        n = max(min(self.n_cap, self.n_tpot if np.isfinite(self.n_tpot) else 1.0), 1.0)
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

    def ok(self, rate_rps: float) -> np.ndarray:
        """P(the request's mean TPOT meets the target and it is admitted without a KV/batch stall)."""
        nbar = self.mean_batch(rate_rps)
        limit = min(self.n_tpot, self.n_cap)
        return self.fits * _batch_ok(nbar, limit, self.var_factor, self.has_decode)


def _batch_ok(nbar: float, limit: float, var_factor: np.ndarray, has_decode: np.ndarray) -> np.ndarray:
    if not np.isfinite(nbar) or limit == float("-inf"):
        return np.zeros(var_factor.size)
    if nbar <= 0:
        return np.where(has_decode, 1.0 if limit >= 1.0 or limit >= 0 else 0.0, 1.0)
    z = (limit - nbar) / np.sqrt(var_factor * nbar)
    return np.where(has_decode, ndtr(z), ndtr((limit - nbar) / np.sqrt(nbar)))


# ---------------------------------------------------------------- colocated (chunked prefill)


@dataclass(frozen=True)
class ColocatedModel:
    """Prefill chunks mixed into decode steps (vLLM chunked prefill) on one group."""

    decode_step_s: np.ndarray  # step with N decodes and no prefill, N = 0..max_batch
    full_step_s: np.ndarray  # step with N decodes plus a full prefill chunk (budget - N tokens)
    chunk_tokens: np.ndarray  # prefill tokens a full step carries at N
    prompt_tokens: np.ndarray
    mean_prompt_tokens: float
    mean_sq_prompt_tokens: float
    mean_steps: float
    n_cap: float
    fits: np.ndarray
    var_factor: np.ndarray
    has_decode: np.ndarray
    kv_capacity_tokens: int

    @classmethod
    def build(cls, gp: GroupPerf, sample: LengthSample, max_batch: int = DEFAULT_MAX_BATCH_SIZE,
              chunk_budget: int = DEFAULT_CHUNK_TOKEN_BUDGET) -> ColocatedModel:
        n = np.arange(max_batch + 1, dtype=float)
        nn = np.maximum(n, 1.0)
        ctx = sample.decode_context_tokens
        chunk = np.maximum(chunk_budget - n, 1.0)
        ptw = sample.token_weighted_prompt_tokens
        dec = mixed_step_time_s(gp, nn, nn * ctx, 0.0, 0.0, 0.0)
        full = mixed_step_time_s(gp, n, n * ctx, chunk, chunk * ptw, chunk / max(sample.mean_prompt_tokens, 1.0))
        cap = gp.kv_capacity_tokens
        return cls(dec, full, chunk, sample.prompt_tokens, sample.mean_prompt_tokens,
                   float((sample.prompt_tokens ** 2).mean()), sample.mean_decode_steps,
                   float(min(max_batch, cap / max(sample.decode_reserve_tokens, 1.0))),
                   (sample.reserve_tokens <= cap).astype(float),
                   occupancy_variance_factor(sample.decode_steps, sample.mean_decode_steps),
                   sample.decode_steps > 0, cap)

    def guess_capacity_rps(self) -> float:
        return float(self.chunk_tokens[0] / max(self.mean_prompt_tokens * self.full_step_s[0], _EPS))

    def _state(self, rate_rps: float) -> tuple[float, np.ndarray, np.ndarray]:
        """(mean decode batch, prefill utilisation per N, TPOT per N) at this rate."""
        util = rate_rps * self.mean_prompt_tokens * self.full_step_s / self.chunk_tokens
        with np.errstate(divide="ignore", invalid="ignore"):
            tpot = 1.0 / (np.minimum(util, 1.0) / self.full_step_s + np.maximum(1.0 - util, 0.0) / self.decode_step_s)
        n = np.arange(tpot.size, dtype=float)
        h = np.where(util < 1.0, rate_rps * self.mean_steps * tpot - n, np.inf)
        return (first_crossing(h) if rate_rps > 0 else 0.0), util, tpot

    def tpot_s(self, rate_rps: float) -> float:
        nbar, _, tpot = self._state(rate_rps)
        return interp(tpot, max(nbar, 1.0)) if np.isfinite(nbar) else float("inf")

    def ok(self, rate_rps: float, ttft_s: float, tpot_target_s: float) -> np.ndarray:
        """P(TTFT and TPOT both met) per sampled request."""
        nbar, util, tpot = self._state(rate_rps)
        if not np.isfinite(nbar):
            return np.zeros(self.prompt_tokens.size)
        per_token = interp(self.full_step_s / self.chunk_tokens, nbar)
        service = self.prompt_tokens * per_token
        rho, m = mg1(rate_rps, self.mean_prompt_tokens * per_token, self.mean_sq_prompt_tokens * per_token ** 2)
        ttft = 1.0 - wait_exceeds(ttft_s - service, rho, m)
        limit = min(last_below(tpot, tpot_target_s), self.n_cap)
        return self.fits * ttft * _batch_ok(nbar, limit, self.var_factor, self.has_decode)
