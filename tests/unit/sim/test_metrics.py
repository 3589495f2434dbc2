"""Metrics: attainment, throughput, percentiles, latency deadline, and the max-rate bisection."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_builders import MODEL, colocated_plan, constant_workload, disagg_plan, two_node_cluster

from thunderserve.sim import LoadConfig, SimConfig, SimResult, compute_metrics, max_rate_at_slo, simulate
from thunderserve.sim.metrics import (
    attainment_vs_factor,
    latency_deadline_factor,
    latency_deadline_scale,
    meets_slo,
    poisson_stream,
    slo_attainment,
)
from thunderserve.spec.slo import SloSpec

SLO = SloSpec(ttft_ms=1000, tpot_ms=100, attainment_target=0.75, scale=5.0)


def result(ttft: list[float], tpot: list[float], output: int = 11, warmup_s: float = 0.0) -> SimResult:
    n = len(ttft)
    arrival = np.arange(n, dtype=float)
    first = arrival + np.asarray(ttft)
    finish = first + np.asarray(tpot) * (output - 1)
    return SimResult(group_ids=("c0",), arrival_s=arrival, first_token_s=first, finish_s=finish,
                     prompt_tokens=np.full(n, 100), output_tokens=np.full(n, output), entry_group=np.zeros(n, int),
                     decode_group=np.full(n, -1), warmup_s=warmup_s, completed=True, oversized_requests=0,
                     end_s=float(finish.max()), events=0, wall_s=0.0)


def test_attainment_needs_both_targets() -> None:
    r = result([0.5, 1.5, 0.5, 0.5], [0.05, 0.05, 0.2, 0.1])
    assert slo_attainment(r, SLO) == pytest.approx(0.5)  # #1 misses TTFT, #2 misses TPOT


def test_unfinished_requests_count_as_misses_and_warmup_is_excluded() -> None:
    r = result([0.5, 0.5, 0.5, 0.5], [0.05] * 4, warmup_s=1.0)
    r = SimResult(**{**r.__dict__, "finish_s": np.array([r.finish_s[0], np.nan, r.finish_s[2], r.finish_s[3]])})
    m = compute_metrics(r, SLO)
    assert m.num_requests == 3
    assert m.slo_attainment == pytest.approx(2 / 3)


def test_throughput_and_percentiles() -> None:
    r = result([0.1 * k for k in range(1, 11)], [0.01] * 10)
    m = compute_metrics(r, SLO)
    assert m.throughput_rps == pytest.approx(10 / r.finish_s.max())
    assert m.throughput_tokens_s == pytest.approx(110 / r.finish_s.max())
    assert m.ttft_s.p50 == pytest.approx(0.55)
    assert m.ttft_s.p99 == pytest.approx(np.percentile(np.arange(1, 11) * 0.1, 99))
    assert m.to_dict()["p99_tpot_s"] == pytest.approx(0.01)


def test_latency_deadline_is_where_a_bisection_on_the_scale_lands() -> None:
    rng = np.random.default_rng(0)
    r = result(list(rng.uniform(0.1, 3.0, 200)), list(rng.uniform(0.01, 0.3, 200)))
    f = latency_deadline_factor(r, SLO)
    assert slo_attainment(r, SLO.scaled(f)) >= SLO.attainment_target
    assert slo_attainment(r, SLO.scaled(f * (1 - 1e-9))) < SLO.attainment_target
    lo, hi = 1e-3, 1e3  # bisection on the scale converges to the same point
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if slo_attainment(r, SLO.scaled(mid)) >= SLO.attainment_target else (mid, hi)
    assert hi == pytest.approx(f, rel=1e-9)
    assert latency_deadline_scale(r, SLO) == pytest.approx(5.0 * f)
    curve = attainment_vs_factor(r, SLO, np.array([f * 0.5, f, f * 10]))
    assert curve[1] >= 0.75 and curve[0] < 0.75 and curve[2] == 1.0


def test_max_rate_bisection_brackets_the_answer() -> None:
    cluster = two_node_cluster()
    wl = constant_workload(1000, 20)
    slo = SloSpec(ttft_ms=5.0, tpot_ms=1.0, attainment_target=0.9)
    load = LoadConfig(duration_s=5.0, min_requests=400, rate_tolerance=0.05)
    cfg = SimConfig(warmup_s=0.5)
    found = max_rate_at_slo(disagg_plan(), cluster, MODEL, wl, slo, cfg, load)
    assert found.rate_rps > 0
    passing = [r for r, ok in found.probes if ok]
    failing = [r for r, ok in found.probes if not ok]
    assert max(passing) == found.rate_rps
    above = min(r for r in failing if r > found.rate_rps)
    assert (above - found.rate_rps) / above <= 0.05
    stream = poisson_stream(wl, load, cfg.warmup_s)
    # The early-stopping check agrees with a full run on both sides of the answer.
    for rate in (found.rate_rps, above):
        full = simulate(disagg_plan(), cluster, MODEL, *stream(rate), cfg)
        assert meets_slo(disagg_plan(), cluster, MODEL, stream(rate), slo, cfg) == (
            slo_attainment(full, slo) >= slo.attainment_target)


def test_unreachable_slo_gives_zero_rate() -> None:
    slo = SloSpec(ttft_ms=1e-6, tpot_ms=1e-6, attainment_target=0.9)
    found = max_rate_at_slo(colocated_plan(), two_node_cluster(), MODEL, constant_workload(100, 5), slo,
                            SimConfig(warmup_s=0.0), LoadConfig(duration_s=2.0, min_requests=50))
    assert found.rate_rps == 0.0 and not any(ok for _, ok in found.probes)
