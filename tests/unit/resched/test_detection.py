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
from thunderserve.resched.monitor import kaplan_meier, tail_residual_tokens
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


def test_kaplan_meier_without_censoring_is_the_empirical_distribution() -> None:
    d = kaplan_meier(np.array([3, 1, 3, 7]), np.array([], dtype=np.int64))
    assert list(d.tokens) == [1, 3, 7] and np.allclose(d.mass, [0.25, 0.5, 0.25])
    assert d.mean == pytest.approx(3.5)


def test_kaplan_meier_moves_censored_mass_to_longer_outputs() -> None:
    # exact 2 and 4; one output known to be >= 3: it is at risk at 2 (not at 4), so 2 keeps 1/3 and 4 gets 2/3
    d = kaplan_meier(np.array([2, 4]), np.array([3]))
    assert list(d.tokens) == [2, 4] and np.allclose(d.mass, [1 / 3, 2 / 3])
    # nothing finished beyond the bounds: the survivors share the rest, each at its bound plus the mean
    # residual of a geometric tail fitted from the median finished length (2) on: 1 stop in 1 + 3 + 5 trials,
    # hazard 1/9, residual (1 - 1/9) / (1/9) = 8 tokens
    assert tail_residual_tokens(np.array([2]), np.array([5, 7])) == pytest.approx(8.0)
    tail = kaplan_meier(np.array([2]), np.array([5, 7]))
    assert list(tail.tokens) == [2, 13, 15] and np.allclose(tail.mass, [1 / 3, 1 / 3, 1 / 3])
    only_censored = kaplan_meier(np.array([], dtype=np.int64), np.array([4, 4, 9]))
    assert list(only_censored.tokens) == [4, 9] and np.allclose(only_censored.mass, [2 / 3, 1 / 3])


def shifted_monitor(now: float, window_s: float = 30.0) -> tuple[WorkloadMonitor, WorkloadMonitor, dict[int, int],
                                                                  np.ndarray]:
    """10 req/s; outputs 20 tokens until t=60 s, then uniform on 50..400; a token every 70 ms after a 0.5 s
    prefill. Returns (monitor fed by request, monitor fed anonymously, tokens so far at `now`, true outputs of
    the window's arrivals)."""
    rng = np.random.default_rng(1)
    by_id, anon = WorkloadMonitor(window_s), WorkloadMonitor(window_s)
    events: list[tuple[float, int, int]] = []  # (time, kind 0 arrival / 1 finish, request)
    arrival = np.arange(0.0, now, 0.1)
    output = np.where(arrival < 60.0, 20, rng.integers(50, 401, arrival.size))
    finish = arrival + 0.5 + 0.07 * output
    for r, (a, f) in enumerate(zip(arrival, finish, strict=True)):
        events.append((float(a), 0, r))
        if f <= now:
            events.append((float(f), 1, r))
    for t, kind, r in sorted(events):
        if kind == 0:
            by_id.observe_arrival(t, 1000, request=r)
            anon.observe_arrival(t, 1000)
        else:
            by_id.observe_completion(t, int(output[r]), request=r)
            anon.observe_completion(t, int(output[r]))
    age = now - arrival
    so_far = np.floor((age - 0.5) / 0.07).astype(int)
    progress = {r: int(so_far[r]) for r in range(arrival.size) if finish[r] > now and so_far[r] >= 1}
    window = output[arrival >= now - window_s]
    return by_id, anon, progress, window


def test_monitor_by_request_estimates_output_lengths_right_after_a_shift() -> None:
    by_id, anon, progress, window = shifted_monitor(now=90.0)
    truth = float(window.mean())
    est = by_id.estimate(90.0, progress)
    biased = anon.estimate(90.0)
    assert est is not None and biased is not None
    assert est.mean_output_tokens == pytest.approx(truth, rel=0.1)
    assert biased.mean_output_tokens < 0.8 * truth  # completions alone: the long answers have not finished
    assert est.rate_rps == pytest.approx(10.0, rel=0.05) and est.num_arrivals == window.size
    # without the in-flight progress the unfinished requests say nothing: the estimate falls back to the
    # finished ones (biased low), which is why callers pass it
    assert by_id.estimate(90.0).mean_output_tokens < est.mean_output_tokens  # type: ignore[union-attr]


def test_monitor_by_request_as_workload_keeps_finished_outputs_and_imputes_the_rest_above_their_bound() -> None:
    by_id, _, progress, window = shifted_monitor(now=90.0)
    wl = by_id.as_workload(90.0, "observed", progress)
    again = by_id.as_workload(90.0, "observed", progress)
    assert wl is not None and again is not None
    assert wl.num_requests == window.size
    assert np.array_equal(wl.output_tokens, again.output_tokens)  # deterministic
    first = 90.0 - 30.0
    arrivals = np.arange(0.0, 90.0, 0.1)
    ids = [r for r in range(arrivals.size) if arrivals[r] >= first - 1e-9]
    for out, r in zip(wl.output_tokens, ids, strict=True):
        if r in progress:
            assert out >= progress[r] + 1
    assert wl.mean_output_tokens == pytest.approx(float(window.mean()), rel=0.1)


def test_monitor_by_request_forgets_requests_that_left_the_window() -> None:
    m = WorkloadMonitor(window_s=10)
    for r in range(50):
        m.observe_arrival(r * 0.1, 100, request=r)
        m.observe_completion(r * 0.1 + 0.05, 5, request=r)
    for r in range(50, 100):
        m.observe_arrival(r * 0.5, 200, request=r)
        m.observe_completion(r * 0.5 + 0.1, 50, request=r)
    e = m.estimate(49.9, {})
    assert e is not None and e.mean_prompt_tokens == pytest.approx(200) and e.mean_output_tokens == pytest.approx(50)
    assert len(m._done) == e.num_arrivals  # finished requests older than the window are dropped too


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


def test_a_drift_within_the_windows_sampling_noise_does_not_fire() -> None:
    trig = ShiftTrigger(baseline=est(2048, 28), hold_s=5)
    noisy = WorkloadEstimate(10.0, 2048, 38, 600, 600, prompt_se_tokens=80, output_se_tokens=2.5)
    assert trig.drift(noisy) == pytest.approx((10 - 2 * 2.5) / 28)  # 36% raw, 18% beyond two SEs
    assert not any(trig.update(float(t), noisy) for t in range(100))
    precise = WorkloadEstimate(10.0, 2048, 38, 600, 600, prompt_se_tokens=80, output_se_tokens=0.5)
    assert [t for t in range(100, 200) if trig.update(float(t), precise)] == [105]


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
