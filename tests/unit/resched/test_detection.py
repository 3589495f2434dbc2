"""Detection: workload monitor windows, shift trigger hysteresis, heartbeats, event parsing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from thunderserve.errors import SpecError
from thunderserve.resched import (
    EventKind,
    HeartbeatTracker,
    ShiftTrigger,
    WorkloadEstimate,
    WorkloadMonitor,
    cluster_without,
    failed_gpus,
    parse_event,
)
from thunderserve.resched.events import cluster_with_added
from thunderserve.spec import load_cluster


def est(prompt: float, output: float, rate: float = 5.0) -> WorkloadEstimate:
    return WorkloadEstimate(rate, prompt, output, 100, 100)


def test_monitor_estimates_rate_and_lengths_over_the_window() -> None:
    m = WorkloadMonitor(window_s=10)
    for i in range(100):  # 5 req/s for 20 s: prompts 100 then 300
        t = i * 0.2
        m.observe_arrival(t, 100 if t < 10 else 300)
        m.observe_completion(t, 50)
    e = m.estimate(19.9)
    assert e is not None
    assert e.rate_rps == pytest.approx(5.0, rel=0.05)
    assert e.mean_prompt_tokens == pytest.approx(300)
    w = m.as_workload(19.9)
    assert w is not None and w.num_requests == e.num_arrivals


def test_monitor_needs_data_before_estimating() -> None:
    m = WorkloadMonitor()
    m.observe_arrival(0.0, 10)
    assert m.estimate(1.0) is None


def test_steady_load_for_30_minutes_never_fires() -> None:
    rng = np.random.default_rng(0)
    trig = ShiftTrigger(baseline=est(1155, 211))
    fired = [trig.update(t, est(1155 * rng.uniform(0.85, 1.15), 211 * rng.uniform(0.85, 1.15)))
             for t in np.arange(0, 1800, 1.0)]
    assert not any(fired)


def test_shift_fires_once_after_hold_then_stays_quiet() -> None:
    trig = ShiftTrigger(baseline=est(2048, 28), hold_s=20)
    fired = [t for t in range(0, 1800) if trig.update(float(t), est(2048, 28) if t < 600 else est(1155, 211))]
    assert fired == [620]


def test_noise_around_the_threshold_does_not_flap() -> None:
    trig = ShiftTrigger(baseline=est(1000, 100), hold_s=5, cooldown_s=60)
    fired = []
    for t in range(0, 1800):
        prompt = 1000 * (1.29 if t % 2 else 1.31)  # drift oscillates around enter_drift = 0.30
        fired.append(trig.update(float(t), est(prompt, 100)))
    assert sum(fired) == 0


def test_unfit_prediction_fires_even_without_drift() -> None:
    trig = ShiftTrigger(baseline=est(1000, 100), predict_attainment=lambda e: 0.5 if e.rate_rps > 8 else 0.95,
                        hold_s=10)
    assert not any(trig.update(float(t), est(1000, 100, rate=5)) for t in range(100))
    fired = [t for t in range(100, 200) if trig.update(float(t), est(1000, 100, rate=10))]
    assert fired == [110]


def test_heartbeats_and_transport_errors() -> None:
    hb = HeartbeatTracker(timeout_s=3)
    hb.beat("w0", 0.0)
    hb.beat("w1", 0.0)
    hb.beat("w1", 2.5)
    assert hb.dead(4.0) == {"w0"}
    hb.report_failure("w1")
    assert hb.dead(4.0) == {"w0", "w1"}


def test_parse_events() -> None:
    assert parse_event("fail:n3").node == "n3"
    e = parse_event("600:fail:n3:2", timed=True)
    assert (e.kind, e.node, e.gpu_index, e.at_s) == (EventKind.FAIL, "n3", 2, 600.0)
    assert parse_event("1200:workload:coding", timed=True).workload == "coding"
    with pytest.raises(SpecError, match="unknown event 'explode:n1'"):
        parse_event("explode:n1")
    with pytest.raises(SpecError, match="expected TIME:EVENT"):
        parse_event("soon:fail:n1", timed=True)


def test_failed_gpus_and_surviving_cluster() -> None:
    c = load_cluster("paper-cloud-32")
    assert failed_gpus(c, parse_event("fail:n3")) == {"n3:0", "n3:1", "n3:2", "n3:3"}
    assert failed_gpus(c, parse_event("fail:n3:1")) == {"n3:1"}
    with pytest.raises(SpecError, match="unknown node 'n99'"):
        failed_gpus(c, parse_event("fail:n99"))
    left = cluster_without(c, {"n3:1"})
    assert left.num_gpus == 31 and "n3:1" not in left.by_id and "n3:2" in left.by_id
    assert left.cost_usd_per_hour == pytest.approx(13.544 - 0.45)


def test_added_node_joins_with_links(tmp_path: Path) -> None:
    p = tmp_path / "node.yaml"
    p.write_text("nodes: [{name: n8, gpu: A40, count: 2, zone: dc-a}]\nlinks: [{between: [n8, n0], gbps: 100}]\n")
    c = cluster_with_added(load_cluster("paper-cloud-32"), str(p))
    assert c.num_gpus == 34 and c.by_id["n8:1"].spec.name == "A40"
    assert c.bandwidth_bytes_s(c.by_id["n8:0"], c.by_id["n0:0"]) == 100e9 / 8
