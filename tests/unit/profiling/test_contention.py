"""Neighbour busy fractions of a simulated 1-prefill + 1-decode deployment (weights for a contended profile)."""

from __future__ import annotations

import numpy as np
import pytest

from thunderserve.costmodel.fit import PassKind
from thunderserve.plan import group_perf_of
from thunderserve.profiling.contention import merge_intervals, neighbour_busy, overlap_length, total_length
from thunderserve.runtime.launch.demo import demo_plan, local_cluster
from thunderserve.sim.config import SimConfig
from thunderserve.sim.replay import simulate
from thunderserve.spec import load_model


def test_interval_union_and_overlap() -> None:
    xs = merge_intervals([0.0, 1.0, 5.0, float("nan")], [2.0, 3.0, 6.0, 1.0])
    assert xs == [(0.0, 3.0), (5.0, 6.0)] and total_length(xs) == 4.0
    ys = merge_intervals([2.5, 4.0], [5.5, 4.5])
    assert ys == [(2.5, 5.5)]
    assert overlap_length(xs, ys) == pytest.approx(0.5 + 0.5)
    assert overlap_length(xs, []) == 0.0


def test_neighbour_busy_of_a_simulated_demo_run() -> None:
    model = load_model("smollm2-135m")
    cluster = local_cluster(2)
    plan = demo_plan(model)
    perf = group_perf_of(plan.groups[0], model, cluster)
    # one lone request: its prefill and its decode never overlap anything
    one = simulate(plan, cluster, model, np.array([0.0]), np.array([64]), np.array([8]), SimConfig(warmup_s=0.0))
    assert neighbour_busy(one, perf) == {PassKind.PREFILL: 0.0, PassKind.DECODE: 0.0}
    # a second request arriving while the first decodes: its prefill runs wholly next to a busy decode worker
    t_prefill = perf.prefill_latency_s([64])
    two = simulate(plan, cluster, model, np.array([0.0, 2 * t_prefill]), np.array([64, 64]), np.array([400, 2]),
                   SimConfig(warmup_s=0.0))
    busy = neighbour_busy(two, perf)
    assert two.finish_s[1] < two.finish_s[0]  # the second decode lies inside the first
    assert busy[PassKind.PREFILL] == pytest.approx(0.5)  # one of the two (equal) prefills is contended
    assert busy[PassKind.DECODE] == pytest.approx(t_prefill / (two.finish_s[0] - two.first_token_s[0]))


def test_worker_utilisation_of_a_lone_request() -> None:
    from thunderserve.profiling.contention import worker_utilisation

    model = load_model("smollm2-135m")
    cluster = local_cluster(2)
    plan = demo_plan(model)
    perf = group_perf_of(plan.groups[0], model, cluster)
    res = simulate(plan, cluster, model, np.array([0.0]), np.array([64]), np.array([8]), SimConfig(warmup_s=0.0))
    util = worker_utilisation(res, perf)
    span = float(res.finish_s[0])
    assert util["prefill"] == pytest.approx(perf.prefill_latency_s([64]) / span)
    assert util["decode"] == pytest.approx((res.finish_s[0] - res.first_token_s[0]) / span)
