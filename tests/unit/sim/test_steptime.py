"""Simulator step latencies agree with the cost model in the pure prefill and pure decode cases."""

from __future__ import annotations

import pytest

from builders import make_cluster, make_model
from thunderserve.costmodel import group_perf
from thunderserve.sim.steptime import GroupTimer

MODEL = make_model(num_layers=4)
CLUSTER = make_cluster((("n0", "TOY", 4),))


def timer(pp: int) -> GroupTimer:
    gpus = CLUSTER.gpus
    per = 4 // pp
    stages = [(gpus[i * per:(i + 1) * per], MODEL.num_layers // pp) for i in range(pp)]
    return GroupTimer(group_perf(MODEL, stages, CLUSTER))


def test_mixed_step_without_decodes_is_the_prefill_time() -> None:
    t = timer(1)
    chunks = [300, 500]
    expect = t.perf.prefill_time_s(800, 300**2 + 500**2, 2)
    assert t.mixed_step_s(0, 0.0, chunks, [0, 0], completing=2) == pytest.approx(expect, rel=1e-12)


def test_mixed_step_without_chunks_is_the_decode_time() -> None:
    t = timer(1)
    assert t.mixed_step_s(16, 16 * 700.0, [], [], 0) == pytest.approx(t.perf.decode_time_s(16, 16 * 700.0),
                                                                      rel=1e-12)


def test_pipelined_decode_step_is_between_bottleneck_and_full_latency() -> None:
    t = timer(2)
    full = t.perf.decode_time_s(32, 32 * 500.0)
    step = t.decode_step_s(32, 32 * 500.0)
    # Two micro-batches of 16 circulate: each token costs at least the latency of a half batch, and at most
    # the full batch's latency (pipelining never makes a step slower than running the batch whole).
    assert t.perf.decode_time_s(16, 16 * 500.0) <= step <= full + 1e-12
    assert t.decode_step_s(1, 500.0) == pytest.approx(t.perf.decode_time_s(1, 500.0), rel=1e-12)


def test_chunk_with_prefix_costs_more_than_without() -> None:
    t = timer(1)
    assert t.mixed_step_s(0, 0.0, [512], [1024], 1) > t.mixed_step_s(0, 0.0, [512], [0], 1)
