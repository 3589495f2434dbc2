"""Rescheduling policies in the simulation loop: detection delays, decisions, apply costs, no flapping,
determinism, and the timeline's metrics, report and errors (small clusters, short runs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from sim_builders import two_node_cluster

from builders import make_model, make_plan
from thunderserve.errors import SpecError
from thunderserve.report.compare import finite_json
from thunderserve.report.timeline import plot_timeline, timeline_checks, timeline_table
from thunderserve.resched import parse_event
from thunderserve.resched.replan import PROCESS_START_S
from thunderserve.scheduler import SchedulerConfig
from thunderserve.sim import SimConfig
from thunderserve.sim.timeline import PolicyRun, ReschedPolicy, TimelineConfig, run_timeline, shifting_stream
from thunderserve.spec import SloSpec
from thunderserve.spec.workload import WorkloadSpec

CLUSTER = two_node_cluster()
MODEL = make_model(num_layers=24, hidden_size=4096, num_heads=32, num_kv_heads=32, intermediate_size=11008)
L = [0, 24]
PLAN = make_plan([(f"c{i}", "colocated", [[g]], L) for i, g in enumerate(("a:0", "a:1", "b:0", "b:1"))],
                 entry={f"c{i}": 0.25 for i in range(4)})
SLO = SloSpec(ttft_ms=2000, tpot_ms=60, attainment_target=0.9)
SCHED = SchedulerConfig(max_evaluations=100_000, max_iterations=20, patience=20)
CFG = TimelineConfig(light_decision_s=0.1, full_decision_s=5.0, scheduler=SCHED)
SIM = SimConfig(warmup_s=0)


def workload(name: str, prompt: int, output: int, n: int = 200, seed: int = 0) -> WorkloadSpec:
    rng = np.random.default_rng(seed)
    p = rng.integers(prompt // 2, prompt * 3 // 2, size=n)
    o = rng.integers(max(output // 2, 1), output * 3 // 2, size=n)
    return WorkloadSpec(name, np.arange(n, dtype=float), p.astype(np.int64), o.astype(np.int64))


SHORT = workload("short", 400, 30)
LONG = workload("long", 150, 200)


def timeline(events: list[str], duration: float = 300.0, rate: float = 8.0, wl: WorkloadSpec = SHORT,
             policies: tuple[str, ...] = ("none", "lightweight", "full"), **kw):  # type: ignore[no-untyped-def]
    return run_timeline(PLAN, CLUSTER, MODEL, SLO, wl, [parse_event(e, timed=True) for e in events], rate,
                        duration, policies=[ReschedPolicy(p) for p in policies], config=kw.pop("config", CFG),
                        sim_config=SIM, resolve=lambda name: {"short": SHORT, "long": LONG}[name], **kw)


@pytest.fixture(scope="module")
def failure():  # type: ignore[no-untyped-def]
    return timeline(["100:fail:b"])


def test_a_failure_is_detected_after_the_heartbeat_timeout_by_every_policy(failure) -> None:  # type: ignore[no-untyped-def]
    for run in failure.runs.values():
        (det,) = [d for d in run.detections if d.kind == "fail"]
        assert det.event_s == 100.0
        assert CFG.heartbeat_timeout_s <= det.delay_s <= CFG.heartbeat_timeout_s + CFG.tick_s
        assert run.unfinished == 0  # every request finished exactly once (NaN = never, twice raises)
        assert (run.retries > 0).sum() > 0  # requests on the dead node started over


def test_none_only_excludes_the_dead_groups(failure) -> None:  # type: ignore[no-untyped-def]
    run = failure.runs["none"]
    assert not run.replans
    alive = {"c0", "c1"}
    late = run.arrival_s > 110.0
    assert {run.group_ids[g] for g in run.entry_group[late]} == alive


def test_lightweight_drops_the_dead_groups_at_once_and_full_restarts(failure) -> None:  # type: ignore[no-untyped-def]
    light = failure.runs["lightweight"].replans
    assert len(light) == 1 and light[0].cause == "fail:b" and light[0].decision_time_s == 0.1
    assert light[0].applied_s == pytest.approx(light[0].detected_s + 0.1)
    assert all(not c.startswith(("relayout", "add")) for c in light[0].changes)  # no reload needed
    (full,) = failure.runs["full"].replans
    assert full.decision_time_s == 5.0 and full.changes[0].startswith("restart")
    assert full.apply_time_s > PROCESS_START_S and full.requests_restarted > 0
    run = failure.runs["full"]
    down = (full.applied_s, full.ready_s)
    assert not np.any((run.finish_s > down[0]) & (run.finish_s < down[1]))  # nothing served while restarting


def test_a_workload_shift_is_detected_by_the_monitor_and_only_rescheduling_policies_react() -> None:
    res = timeline(["160:workload:long"], duration=320.0, rate=6.0, policies=("none", "lightweight"))
    assert not res.runs["none"].replans and not res.runs["none"].detections
    run = res.runs["lightweight"]
    shift = [d for d in run.detections if d.kind == "shift"]
    assert shift and shift[0].event_s == 160.0
    assert CFG.hold_s <= shift[0].delay_s <= CFG.hold_s + 30.0
    assert run.replans[0].cause == "workload shift" and run.replans[0].detected_s == shift[0].detected_s
    # The stream really changed its mix at 160 s (and kept its rate).
    late = res.stream.arrival_s >= 160.0
    assert res.stream.output_tokens[late].mean() > 3 * res.stream.output_tokens[~late].mean()


def test_steady_load_never_reschedules() -> None:
    res = timeline([], duration=600.0, rate=8.0, policies=("lightweight", "full"))
    for run in res.runs.values():
        assert not run.replans and not run.detections
    doc = finite_json(res.to_dict())
    assert timeline_checks(doc) == [{"name": "steady load: re-plans (all policies)", "measured": 0,
                                     "target": "0", "ok": True}]


def test_runs_are_deterministic_with_fixed_decision_times() -> None:
    a = timeline(["60:fail:b:1"], duration=150.0, policies=("lightweight",))
    b = timeline(["60:fail:b:1"], duration=150.0, policies=("lightweight",))
    ra, rb = a.runs["lightweight"], b.runs["lightweight"]
    assert np.array_equal(ra.finish_s, rb.finish_s) and np.array_equal(ra.retries, rb.retries)
    assert [r.plan for r in ra.replans] == [r.plan for r in rb.replans]


def test_added_gpus_are_used_by_lightweight_after_their_load(tmp_path: Path) -> None:
    node = tmp_path / "node.yaml"
    node.write_text("{name: c, gpu: TOY, count: 1, zone: c}\n")
    one = make_plan([("c0", "colocated", [["a:0"]], L)], entry={"c0": 1.0})
    res = run_timeline(one, CLUSTER, MODEL, SLO, SHORT, [parse_event(f"50:add:{node}", timed=True)], 4.0, 150.0,
                       policies=[ReschedPolicy.NONE, ReschedPolicy.LIGHTWEIGHT], config=CFG, sim_config=SIM)
    (rec,) = res.runs["lightweight"].replans
    assert rec.detection_delay_s == 0.0 and any(c.startswith("add") for c in rec.changes)
    assert rec.ready_s - rec.applied_s > PROCESS_START_S  # weights loaded first
    run = res.runs["lightweight"]
    used = {run.group_ids[g] for g in run.entry_group[run.arrival_s > rec.ready_s + 1]}
    assert len(used) == 2 and not res.runs["none"].replans


def test_timeline_metrics_on_a_synthetic_run() -> None:
    arrival = np.arange(0.0, 120.0, 1.0)
    ok = (arrival < 30) | (arrival >= 70)  # misses from 30 s to 70 s
    run = PolicyRun("x", arrival, arrival + np.where(ok, 0.1, 10.0), arrival + 1.0, np.full(120, 10),
                    np.full(120, 2), np.zeros(120, dtype=np.int64))
    slo = SloSpec(ttft_ms=1000, tpot_ms=1000, attainment_target=0.9)
    buckets = run.buckets(slo, 30.0, 120.0)
    assert [b[0] for b in buckets] == [0.0, 30.0, 60.0, 90.0] and [b[2] for b in buckets] == [30] * 4
    assert buckets[1][1] == 0.0 and buckets[2][1] == pytest.approx(20 / 30)
    assert run.restored_at_s(slo, 30.0, 30.0, 120.0) == 90.0
    assert run.attainment(slo, 70.0, 120.0) == 1.0


def test_shifting_stream_switches_lengths_and_keeps_the_poisson_arrivals() -> None:
    plain = SHORT.poisson_requests(5.0, 100.0, seed=3)
    one = shifting_stream([(0.0, SHORT)], 5.0, 100.0, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(plain, (one.arrival_s, one.prompt_tokens, one.output_tokens),
                                                    strict=True))
    two = shifting_stream([(0.0, SHORT), (50.0, LONG)], 5.0, 100.0, seed=3)
    assert np.array_equal(two.arrival_s, one.arrival_s)
    late = two.arrival_s >= 50.0
    assert set(two.output_tokens[late]) <= set(LONG.output_tokens) and (two.segment[late] == 1).all()
    assert np.array_equal(two.output_tokens[~late], one.output_tokens[~late])


def test_report_renders_the_document(failure, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    doc = finite_json(dataclasses.replace(failure, reference=failure.runs["lightweight"]).to_dict())
    doc.update(model="toy", cluster="test")
    checks = timeline_checks(doc)
    names = [c["name"] for c in checks]
    assert any("restored" in n for n in names) and any("fresh" in n for n in names)
    assert doc["policies"]["lightweight"]["final_vs_fresh"] == pytest.approx(1.0)
    assert timeline_table(doc).row_count == 4
    png = plot_timeline(doc, tmp_path / "t.png", checks)
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize(("events", "match"), [
    (["900:fail:a"], "after the end"),
    (["10:fail:zz"], "unknown node"),
    (["10:workload:nope"], "nope"),
])
def test_bad_events_are_one_line_errors(events: list[str], match: str) -> None:
    with pytest.raises((SpecError, KeyError), match=match):
        timeline(events, duration=100.0, policies=("none",))
