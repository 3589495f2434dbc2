"""Queueing formulas and the vectorised step times against the cost model and the simulator's step times."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sched_builders import cluster

from thunderserve.costmodel.perf import group_perf
from thunderserve.scheduler.perfvec import decode_step_s, mixed_step_s, prefill_times_s
from thunderserve.scheduler.queueing import (
    admission_wait,
    first_crossing,
    last_below,
    max_rate,
    mg1,
    occupancy_variance_factor,
    two_waits_exceed,
    wait_exceeds,
)
from thunderserve.sim.steptime import GroupTimer
from thunderserve.spec import load_model

LLAMA7 = load_model("llama-2-7b")


def _perf(pp: int, tp: int = 1):  # type: ignore[no-untyped-def]
    c = cluster((("a", "TOY", 4), ("b", "SLOW", 4)), default_gbps=10)
    gpus = list(c.gpus)
    per = LLAMA7.num_layers // pp
    stages = [(gpus[i * tp:(i + 1) * tp], per if i < pp - 1 else LLAMA7.num_layers - per * (pp - 1))
              for i in range(pp)]
    if pp == 2 and tp == 1:
        stages = [([c.by_id["a:0"]], 20), ([c.by_id["b:0"]], 12)]
    return group_perf(LLAMA7, stages, c)


@pytest.mark.parametrize("pp,tp", [(1, 1), (1, 4), (2, 1), (4, 2)])
def test_vectorised_times_equal_the_cost_model_and_the_simulator(pp: int, tp: int) -> None:
    perf = _perf(pp, tp)
    timer = GroupTimer(perf)
    for prompt in (1, 100, 1500):
        lat, bottleneck = prefill_times_s(perf, float(prompt), float(prompt) ** 2, 1.0)
        assert float(lat) == pytest.approx(perf.prefill_time_s(prompt, prompt ** 2, 1), rel=1e-12)
        assert float(bottleneck) == pytest.approx(perf.prefill_stage_max_s(prompt, prompt ** 2, 1), rel=1e-12)
    for batch in (1, 3, 64):
        ctx = batch * 700.0
        assert float(decode_step_s(perf, float(batch), ctx)) == pytest.approx(timer.decode_step_s(batch, ctx),
                                                                               rel=1e-12)
    chunks, done = [300, 500], [0, 200]
    want = timer.mixed_step_s(5, 3000.0, chunks, done, 1)
    got = mixed_step_s(perf, 5.0, 3000.0, 800.0, sum(c * c + 2 * c * d for c, d in zip(chunks, done, strict=True)),
                       200.0, 1.0, 2.0)
    assert float(got) == pytest.approx(want, rel=1e-12)


def test_mm1_wait_is_exact_for_exponential_service() -> None:
    lam, mu = 0.7, 1.0
    rho, busy = mg1(lam, 1 / mu, 2 / mu ** 2)  # exponential service: E[S²] = 2/μ²
    assert rho == pytest.approx(0.7)
    t = np.array([0.0, 1.0, 3.0])
    assert wait_exceeds(t, rho, busy) == pytest.approx(rho * np.exp(-(mu - lam) * t))
    assert wait_exceeds(np.array([-1.0]), rho, busy)[0] == 1.0
    assert mg1(1.2, 1.0, 2.0)[1] == math.inf


def test_sum_of_two_waits_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    n = 400_000
    w1 = np.where(rng.random(n) < 0.6, rng.exponential(2.0, n), 0.0)
    w2 = np.where(rng.random(n) < 0.3, rng.exponential(0.5, n), 0.0)
    t = np.array([0.0, 0.5, 2.0, 5.0])
    want = [(w1 + w2 > x).mean() for x in t]
    assert two_waits_exceed(t, 0.6, 2.0, 0.3, 0.5) == pytest.approx(want, abs=4e-3)
    assert two_waits_exceed(t, 0.6, 1.0, 0.3, 1.0)[2] == pytest.approx(
        (np.where(rng.random(n) < 0.6, rng.exponential(1.0, n), 0) + np.where(rng.random(n) < 0.3,
                                                                           rng.exponential(1.0, n), 0) > 2).mean(),
        abs=4e-3)


def test_erlang_c_known_values() -> None:
    p, mean = admission_wait(rate_rps=2.0, mean_hold_s=1.0, slots=3)  # a = 2 Erlang, c = 3
    assert p == pytest.approx(4 / 9, rel=1e-9)
    assert mean == pytest.approx(1.0)
    assert admission_wait(3.0, 1.0, 3) == (1.0, math.inf)
    assert admission_wait(0.0, 1.0, 3) == (0.0, 0.0)


def test_helpers() -> None:
    assert first_crossing(np.array([3.0, 1.0, -1.0])) == pytest.approx(1.5)
    assert first_crossing(np.array([1.0, 2.0])) == math.inf
    assert last_below(np.array([1.0, 2.0, 4.0]), 3.0) == pytest.approx(1.5)
    assert last_below(np.array([5.0, 6.0]), 3.0) == -math.inf
    v = occupancy_variance_factor(np.array([0.01, 1.0, 100.0]), 1.0)
    assert v[0] == pytest.approx(1.0, abs=0.01) and v[2] == pytest.approx(2 / 100, rel=0.05) and v[1] < 1
    assert max_rate(lambda r: 1.0 - r / 10.0, 0.9, 0.3) == pytest.approx(1.0, rel=2e-3)
    assert max_rate(lambda r: 0.5, 0.9, 1.0) == 0.0
