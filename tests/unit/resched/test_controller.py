"""The re-scheduling controller with fakes: failure and shift decisions, re-planning, reconcile, admin paths."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from builders import make_cluster, make_model, make_plan
from thunderserve.plan import Phase, Plan, Routing
from thunderserve.resched.actuator import FakeActuator
from thunderserve.resched.controller import (
    ControllerConfig,
    Decision,
    ReplanContext,
    ReschedController,
    ReschedDecider,
    survivor_plan,
)
from thunderserve.resched.events import parse_event
from thunderserve.resched.monitor import InFlight, WorkloadEstimate
from thunderserve.resched.reconcile import ActionKind, ActionStatus, DeploymentState
from thunderserve.resched.replan import ReplanResult, lightweight_replan
from thunderserve.spec import SloSpec, WorkloadSpec

MODEL = make_model()
CLUSTER = make_cluster((("n0", "TOY", 4),))
SLO = SloSpec(ttft_ms=2000, tpot_ms=200)
L = [0, 2]


def workload(prompt: int = 200, output: int = 100, n: int = 50) -> WorkloadSpec:
    return WorkloadSpec(name="w", arrival_times_s=np.arange(n) * 0.1, prompt_tokens=np.full(n, prompt),
                        output_tokens=np.full(n, output))


PLAN = make_plan([("p0", "prefill", [["n0:0"]], L), ("p1", "prefill", [["n0:1"]], L),
                  ("d0", "decode", [["n0:2"]], L), ("d1", "decode", [["n0:3"]], L)],
                 entry={"p0": 0.5, "p1": 0.5}, kv={"p0": {"d0": 0.5, "d1": 0.5}, "p1": {"d0": 0.5, "d1": 0.5}})


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass(frozen=True)
class Rec:
    """What the router's RequestRecord gives the controller."""

    arrival_s: float
    finish_s: float
    prompt_tokens: int
    completion_tokens: int
    outcome: str = "finished"
    request_id: str = ""


def make_controller(replan: Any = lightweight_replan, config: ControllerConfig = ControllerConfig(),
                    **fake_kw: Any) -> tuple[ReschedController, FakeActuator, Clock]:
    clock = Clock()
    fake = FakeActuator(DeploymentState.from_plan(PLAN), refuse_starts=True, **fake_kw)
    ctl = ReschedController(fake, PLAN, ReplanContext(CLUSTER, MODEL, SLO, workload()), config, clock=clock,
                            replan=replan)
    return ctl, fake, clock


def test_a_dead_worker_is_replanned_without_its_gpus_and_dropped() -> None:
    ctl, fake, clock = make_controller()
    assert asyncio.run(ctl.tick()) is None and fake.applied == []
    fake.kill("d1")
    clock.now_s = 1.0
    record = asyncio.run(ctl.tick())
    assert record is not None and record.cause == "fail:d1" and record.path == "lightweight"
    assert ctl.lost_gpus == {"n0:3"} and "n0:3" not in record.target.gpus
    assert {g.id for g in record.target.groups} == {"p0", "p1", "d0"}
    assert all(a.status is ActionStatus.APPLIED for a in record.actions)
    assert record.actions[-1].kind is ActionKind.DROP and record.actions[-1].group == "d1"
    state = fake.state()
    assert {g.id for g in state.groups} == {"p0", "p1", "d0"} and all(g.alive for g in state.groups)
    assert "d1" not in str(state.routing) and fake.loads == {}  # surviving groups keep their weights
    assert fake.running_plan().routing == state.routing and fake.target == record.target
    clock.now_s = 2.0
    assert asyncio.run(ctl.tick()) is None  # handled once


def test_failed_replan_falls_back_to_the_survivors() -> None:
    def broken(*_: Any) -> ReplanResult:
        raise RuntimeError("LP solver exploded")

    ctl, fake, _ = make_controller(replan=broken)
    fake.kill("d0")
    record = asyncio.run(ctl.tick())
    assert record is not None and record.path == "survivors" and "exploded" in record.error
    assert fake.state().routing == Routing(entry={"p0": 0.5, "p1": 0.5}, kv={"p0": {"d1": 1.0}, "p1": {"d1": 1.0}})
    assert {g.id for g in fake.state().groups} == {"p0", "p1", "d1"}


def test_workload_shift_fires_after_warmup_and_hold_and_replans_for_the_observed_mix() -> None:
    seen: list[WorkloadSpec] = []

    def replan(plan: Plan, cluster: Any, model: Any, w: WorkloadSpec, slo: Any) -> ReplanResult:
        seen.append(w)
        return lightweight_replan(plan, cluster, model, w, slo)

    config = ControllerConfig(warmup_s=10.0, hold_s=5.0, cooldown_s=100.0, monitor_window_s=20.0)
    ctl, fake, clock = make_controller(replan=replan, config=config)
    records = []
    for step in range(80):  # one request per 0.5 s; prompts jump from 100 to 1000 tokens at t = 20 s
        clock.now_s = step * 0.5
        prompt = 100 if clock.now_s < 20 else 1000
        ctl.observe(Rec(clock.now_s - 0.4, clock.now_s, prompt, 50, request_id=f"ok{step}"))
        ctl.observe(Rec(clock.now_s, clock.now_s, prompt, 50, "failed", f"bad{step}"))  # ignored
        if (r := asyncio.run(ctl.tick())) is not None:
            records.append((clock.now_s, r))
    assert ctl.decider.trigger is not None
    assert [r.cause for _, r in records] == ["workload shift"]  # once: cooldown and hysteresis after
    fired_s = records[0][0]
    assert 25.0 <= fired_s <= 40.0  # drift past 30 % a few seconds after 20 s, then held 5 s
    assert seen and seen[0].mean_prompt_tokens > 300  # planned for the observed (shifted) window
    assert ctl.workload is seen[0]


def test_unfinished_requests_count_in_the_output_estimate_before_they_finish() -> None:
    """After a shift to long answers only the new mix's short ones have finished; the in-flight requests the
    deployment reports still raise the output-length estimate (censored at their tokens so far)."""
    ctl, fake, clock = make_controller()
    for i in range(40):  # short answers, finished
        ctl.observe(Rec(i * 0.5, i * 0.5 + 1.0, 100, 20, request_id=f"s{i}"))
    clock.now_s = 21.0
    finished_only = ctl.monitor.estimate(clock.now_s, ctl.sample_in_flight())
    assert finished_only is not None and finished_only.mean_output_tokens == pytest.approx(20)
    fake.requests = {f"l{i}": InFlight(10.0 + i * 0.5, 100, 150) for i in range(20)}  # 150 tokens and counting
    with_in_flight = ctl.monitor.estimate(clock.now_s, ctl.sample_in_flight())
    assert with_in_flight is not None and with_in_flight.num_arrivals == 60
    assert with_in_flight.mean_output_tokens > 20 + 150 * 20 / 60 * 0.9
    # each one ends exactly once: finished ones become exact lengths, a failed one stays censored
    fake.requests = {}
    ctl.observe(Rec(10.0, 22.0, 100, 400, request_id="l0"))
    ctl.observe(Rec(10.5, 22.0, 100, 3, "failed", "l1"))
    assert "l0" not in ctl._tracked and "l1" not in ctl._tracked and ctl.monitor.estimate(22.0) is not None


def test_admin_events_and_explicit_plans() -> None:
    ctl, fake, _ = make_controller()
    record = asyncio.run(ctl.replan_event(parse_event("fail:n0:2")))  # d0's GPU
    assert record.cause == "admin: fail:n0:2" and ctl.lost_gpus == {"n0:2"}
    assert "d0" not in {g.id for g in fake.state().groups}
    phases = {"p0": Phase.PREFILL, "p1": Phase.DECODE, "d1": Phase.COLOCATED}
    flipped = record.target.model_copy(update={
        "groups": tuple(g.with_phase(phases[g.id]) for g in record.target.groups),
        "routing": Routing(entry={"p0": 0.5, "d1": 0.5}, kv={"p0": {"p1": 1.0}})})
    record = asyncio.run(ctl.replan_to(flipped))
    assert record.path == "explicit" and {g.id: g.phase for g in fake.state().groups} == phases
    assert fake.state().routing == flipped.routing
    assert fake.loads == {} and len(ctl.history) == 2
    record = asyncio.run(ctl.replan_event(parse_event("workload:coding")))
    assert record.cause == "admin: workload:coding" and ctl.workload.name == "coding"
    with pytest.raises(Exception, match="unknown GPU"):
        asyncio.run(ctl.replan_event(parse_event("fail:n0:7")))


def test_a_reconcile_that_crashes_half_way_is_resumed_on_the_next_tick() -> None:
    ctl, fake, _ = make_controller(crash_after=1)
    fake.kill("d1")
    record = asyncio.run(ctl.tick())
    assert record is not None and "reconcile interrupted" in record.error and len(fake.applied) == 1
    fake.crash_after = None
    resumed = asyncio.run(ctl.tick())
    assert resumed is not None and resumed.cause == "resume" and resumed.target == record.target
    assert "d1" not in {g.id for g in fake.state().groups}
    assert len({(a.kind, a.group) for a in fake.applied}) == len(fake.applied)  # no step twice
    assert asyncio.run(ctl.tick()) is None


def test_controller_task_runs_and_stops() -> None:
    async def main() -> None:
        ctl, fake, _ = make_controller(config=ControllerConfig(tick_s=0.01))
        ctl.start()
        fake.kill("p1")
        for _ in range(200):
            if ctl.history:
                break
            await asyncio.sleep(0.01)
        await ctl.stop()
        assert ctl.history and ctl.history[0].cause == "fail:p1"
        assert "p1" not in {g.id for g in fake.state().groups}

    asyncio.run(main())


def test_decider_answers_each_failure_once_and_a_restarted_group_can_fail_again() -> None:
    d = ReschedDecider(ControllerConfig(watch_workload=False))
    state = DeploymentState.from_plan(PLAN, alive={"d0": False})
    first = d.observe(0.0, state, None)
    assert first == Decision("fail:d0", lost_gpus=frozenset({"n0:2"}))
    assert d.observe(1.0, state, None) is None
    assert d.observe(2.0, DeploymentState.from_plan(PLAN), None) is None
    assert d.observe(3.0, state, None) is not None
    assert d.observe(4.0, DeploymentState.from_plan(PLAN), WorkloadEstimate(1, 1, 1, 10, 10)) is None


def test_survivor_plan_keeps_a_way_to_serve() -> None:
    kept = survivor_plan(PLAN, {"n0:0", "n0:2", "n0:3"})
    assert [g.id for g in kept.groups] == ["p0", "d0", "d1"]
    assert kept.routing == Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 0.5, "d1": 0.5}})
    only_decode = survivor_plan(PLAN, {"n0:2", "n0:3"})
    assert [g.phase for g in only_decode.groups] == [Phase.COLOCATED, Phase.COLOCATED]
    assert only_decode.routing == Routing(entry={"d0": 0.5, "d1": 0.5})
    with pytest.raises(ValueError, match="no group"):
        survivor_plan(PLAN, set())
