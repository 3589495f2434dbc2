"""Metrics of a simulated run, max rate at the SLO (bisection on the arrival rate), latency deadline.

Definitions (all over *measured* requests: those arriving at or after the warm-up, see `SimConfig`):
  * SLO attainment: fraction with TTFT <= slo.ttft and mean TPOT <= slo.tpot (both); a request that never
    finished (run stopped early) counts as a miss.
  * throughput: measured requests (and their output tokens) / (last measured finish - warm-up end).
  * p50/p90/p99 of TTFT, TPOT and end-to-end latency (seconds).
  * max_rate_at_slo: the largest Poisson arrival rate whose attainment meets slo.attainment_target, found by
    doubling (or halving) from a hint, then bisection to `LoadConfig.rate_tolerance` relative width (0 when
    even hint / 1024 misses, e.g. the unloaded latency is over the SLO); each probe simulates
    `LoadConfig.duration_s` seconds of arrivals (stretched to at least `min_requests` requests) with the
    first `SimConfig.warmup_s` seconds unmeasured, and stops early once the target is certainly missed.
  * latency deadline: the smallest factor f such that attainment under slo.scaled(f) meets the target at a
    given rate. One run gives every request the factor it needs, max(ttft/ttft_target, tpot/tpot_target);
    the answer is that factor's order statistic at the target (what a bisection on f converges to, exactly).
    Reported as a scale over the reference latency (f x slo.scale) when the SLO was built from a scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from thunderserve.plan import Plan
from thunderserve.sim.config import LoadConfig, SimConfig
from thunderserve.sim.replay import SimResult, simulate
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

Stream = tuple[np.ndarray, np.ndarray, np.ndarray]  # arrival_s, prompt_tokens, output_tokens
StreamFn = Callable[[float], Stream]  # rate_rps -> requests
MAX_DOUBLINGS = 16
MAX_HALVINGS = 10  # the lowest probe is hint / 1024


@dataclass(frozen=True)
class Percentiles:
    p50: float
    p90: float
    p99: float

    @staticmethod
    def of(values: np.ndarray) -> Percentiles:
        v = values[np.isfinite(values)]
        if v.size == 0:
            return Percentiles(math.nan, math.nan, math.nan)
        p = np.percentile(v, [50, 90, 99])
        return Percentiles(float(p[0]), float(p[1]), float(p[2]))


@dataclass(frozen=True)
class SimMetrics:
    num_requests: int  # measured requests
    slo_attainment: float
    throughput_rps: float
    throughput_tokens_s: float  # output tokens per second
    ttft_s: Percentiles
    tpot_s: Percentiles
    e2e_s: Percentiles
    completed: bool

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_requests": self.num_requests, "slo_attainment": self.slo_attainment,
                               "throughput_rps": self.throughput_rps,
                               "throughput_tokens_s": self.throughput_tokens_s}
        for name in ("ttft_s", "tpot_s", "e2e_s"):
            pct: Percentiles = getattr(self, name)
            stem = name.removesuffix("_s")
            out[f"p50_{stem}_s"] = pct.p50
            out[f"p90_{stem}_s"] = pct.p90
            out[f"p99_{stem}_s"] = pct.p99
        return out


def needed_slo_factor(result: SimResult, slo: SloSpec) -> np.ndarray:
    """Per measured request: the smallest factor f with the request meeting slo.scaled(f) (inf: unfinished)."""
    m = result.measured
    need = np.maximum(result.ttft_s[m] / slo.ttft_s, result.tpot_s[m] / slo.tpot_s)
    return np.where(np.isfinite(need), need, np.inf)


def slo_attainment(result: SimResult, slo: SloSpec) -> float:
    need = needed_slo_factor(result, slo)
    return float(np.mean(need <= 1.0)) if need.size else math.nan


def compute_metrics(result: SimResult, slo: SloSpec) -> SimMetrics:
    m = result.measured
    n = int(m.sum())
    finish = result.finish_s[m]
    done = np.isfinite(finish)
    span = float(finish[done].max() - result.warmup_s) if done.any() else math.nan
    tokens = float(result.output_tokens[m][done].sum())
    return SimMetrics(
        num_requests=n,
        slo_attainment=slo_attainment(result, slo),
        throughput_rps=float(done.sum()) / span if span and span > 0 else math.nan,
        throughput_tokens_s=tokens / span if span and span > 0 else math.nan,
        ttft_s=Percentiles.of(result.ttft_s[m]),
        tpot_s=Percentiles.of(result.tpot_s[m][result.output_tokens[m] > 1]),
        e2e_s=Percentiles.of(result.e2e_s[m]),
        completed=result.completed,
    )


def latency_deadline_factor(result: SimResult, slo: SloSpec) -> float:
    """Smallest f such that attainment under slo.scaled(f) >= slo.attainment_target (inf if never)."""
    need = np.sort(needed_slo_factor(result, slo))
    if need.size == 0:
        return math.nan
    k = max(math.ceil(slo.attainment_target * need.size - 1e-9), 1)
    return float(need[k - 1]) * (1.0 + 1e-12)  # a hair above, so slo.scaled(f) passes despite rounding


def latency_deadline_scale(result: SimResult, slo: SloSpec) -> float:
    """The deadline as an SLO scale over the reference latency (the factor itself when slo.scale is unset)."""
    f = latency_deadline_factor(result, slo)
    return f * slo.scale if slo.scale is not None else f


def attainment_vs_factor(result: SimResult, slo: SloSpec, factors: np.ndarray) -> np.ndarray:
    """Attainment under slo.scaled(f) for each f (one run, no re-simulation)."""
    need = np.sort(needed_slo_factor(result, slo))
    if need.size == 0:
        return np.full(len(factors), math.nan)
    return np.searchsorted(need, np.asarray(factors, dtype=float), side="right") / need.size


# -- request streams --------------------------------------------------------------------------------------
def poisson_stream(workload: WorkloadSpec, load: LoadConfig = LoadConfig(), warmup_s: float = 0.0) -> StreamFn:
    """rate -> Poisson arrivals with trace-sampled lengths for max(duration, warm-up + min_requests / rate)."""

    def stream(rate_rps: float) -> Stream:
        duration = max(load.duration_s, warmup_s + load.min_requests / rate_rps)
        return workload.poisson_requests(rate_rps, duration, seed=load.seed)

    return stream


def trace_stream(workload: WorkloadSpec, duration_s: float | None = None) -> StreamFn:
    """rate -> the trace's own timestamps compressed to that mean rate."""

    def stream(rate_rps: float) -> Stream:
        return workload.trace_requests(rate_scale=rate_rps / workload.trace_rate_rps, duration_s=duration_s)

    return stream


def simulate_at_rate(plan: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, rate_rps: float,
                     config: SimConfig = SimConfig(), load: LoadConfig = LoadConfig(),
                     stream: StreamFn | None = None) -> SimResult:
    """One full run at `rate_rps` (Poisson by default)."""
    fn = stream or poisson_stream(workload, load, config.warmup_s)
    return simulate(plan, cluster, model, *fn(rate_rps), config)


# -- max rate at the SLO ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RateSearch:
    rate_rps: float  # largest rate found meeting the SLO (0 when even the smallest probe misses)
    probes: tuple[tuple[float, bool], ...] = field(default=())  # (rate, met) in probe order


def meets_slo(plan: Plan, cluster: Cluster, model: ModelSpec, stream: Stream, slo: SloSpec,
              config: SimConfig, validate: bool = True) -> bool:
    """Whether attainment >= target, stopping the run as soon as the answer is certainly no."""
    arrival = stream[0]
    n = int((arrival >= config.warmup_s).sum())
    if n == 0:
        return True
    allowed = math.floor((1.0 - slo.attainment_target) * n + 1e-9)
    result = simulate(plan, cluster, model, *stream, config, slo=slo, stop_after_failures=allowed,
                      validate=validate)
    return result.completed and slo_attainment(result, slo) >= slo.attainment_target


def max_rate_at_slo(plan: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                    config: SimConfig = SimConfig(), load: LoadConfig = LoadConfig(), *,
                    rate_hint_rps: float | None = None, stream: StreamFn | None = None,
                    progress: Callable[[float, bool], None] | None = None) -> RateSearch:
    """Largest arrival rate meeting the SLO (see module docstring for the protocol)."""
    from thunderserve.plan import validate_plan

    validate_plan(plan, cluster, model)
    fn = stream or poisson_stream(workload, load, config.warmup_s)
    probes: list[tuple[float, bool]] = []

    def ok(rate: float) -> bool:
        met = meets_slo(plan, cluster, model, fn(rate), slo, config, validate=False)
        probes.append((rate, met))
        if progress is not None:
            progress(rate, met)
        return met

    hi = rate_hint_rps if rate_hint_rps and rate_hint_rps > 0 else 1.0
    lo = 0.0
    if ok(hi):
        lo = hi
        for _ in range(MAX_DOUBLINGS):
            hi = lo * 2.0
            if not ok(hi):
                break
            lo = hi
        else:
            return RateSearch(lo, tuple(probes))
    else:
        # Halve down to the floor. Attainment is not monotone in the rate near the target (batching can lift
        # it: a marginal plan met 0.923 at 1 req/s and 0.891 at 0.007), so missing at the floor says nothing
        # about the rates between; a plan missing at every probe (e.g. unloaded latency over the SLO) costs
        # MAX_HALVINGS cheap runs, each stopped after its allowed failures.
        for _ in range(MAX_HALVINGS):
            hi_new = hi / 2.0
            if ok(hi_new):
                lo = hi_new
                break
            hi = hi_new
        else:
            return RateSearch(0.0, tuple(probes))
    while (hi - lo) / hi > load.rate_tolerance:
        mid = 0.5 * (lo + hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return RateSearch(lo, tuple(probes))
