"""Reconcile toward a desired plan: ordering, idempotence, refusals, crash and resume (fake actuator)."""

from __future__ import annotations

import asyncio

import pytest

from builders import make_plan
from thunderserve.plan import Phase, Plan, Routing
from thunderserve.resched.actuator import FakeActuator
from thunderserve.resched.reconcile import (
    ActionKind,
    ActionStatus,
    DeploymentState,
    effective_routing,
    plan_actions,
    reconcile,
    same_routing,
)

L = [0, 2]
GPU_OF = {"p0": "n0:0", "p1": "n0:1", "d0": "n0:2", "d1": "n0:3", "x0": "n0:4"}


def plan_of(groups: dict[str, str], entry: dict[str, float], kv: dict[str, dict[str, float]] | None = None,
            gpus: dict[str, str] | None = None) -> Plan:
    """Groups id -> phase, one GPU each (fixed per id unless `gpus` says otherwise)."""
    where = {**GPU_OF, **(gpus or {})}
    return make_plan([(g, groups[g], [[where[g]]], L) for g in sorted(groups)], entry=entry, kv=kv or {})


BASE = plan_of({"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"},
               entry={"p0": 0.5, "p1": 0.5}, kv={"p0": {"d0": 0.5, "d1": 0.5}, "p1": {"d0": 0.5, "d1": 0.5}})


def run(desired: Plan, fake: FakeActuator):  # type: ignore[no-untyped-def]
    return asyncio.run(reconcile(desired, fake.state(), fake))


def matches(state: DeploymentState, plan: Plan) -> bool:
    return ({(g.id, g.phase, g.stages, g.alive) for g in state.groups}
            == {(g.id, g.phase, g.stages, True) for g in plan.groups}
            and same_routing(state.routing, plan.routing or Routing()))


def test_nothing_to_do_when_actual_equals_desired() -> None:
    fake = FakeActuator(DeploymentState.from_plan(BASE))
    assert plan_actions(BASE, fake.state()) == []
    assert run(BASE, fake) == [] and fake.applied == []


def test_swap_lifts_before_routing_and_lowers_after_then_is_idempotent() -> None:
    desired = plan_of({"p0": "decode", "p1": "prefill", "d0": "decode", "d1": "prefill"},
                      entry={"p1": 0.5, "d1": 0.5}, kv={"p1": {"p0": 0.5, "d0": 0.5}, "d1": {"p0": 0.5, "d0": 0.5}})
    fake = FakeActuator(DeploymentState.from_plan(BASE))
    done = run(desired, fake)
    assert [(a.kind, a.group, a.status) for a in done] == [
        (ActionKind.FLIP, "d1", ActionStatus.APPLIED), (ActionKind.ROUTING, None, ActionStatus.APPLIED),
        (ActionKind.FLIP, "p0", ActionStatus.APPLIED)]
    assert (done[0].from_phase, done[0].phase) == (Phase.DECODE, Phase.PREFILL)
    assert matches(fake.state(), desired)
    assert fake.loads == {}  # flips and routing never load weights
    assert run(desired, fake) == [] and len(fake.applied) == 3


def test_every_step_keeps_new_requests_routable() -> None:
    """After the routing step, every group routed to is alive and in a phase that takes requests."""
    desired = plan_of({"p0": "decode", "p1": "decode", "d0": "colocated", "d1": "prefill"},
                      entry={"d0": 0.5, "d1": 0.5}, kv={"d1": {"p0": 0.5, "p1": 0.5}})
    fake = FakeActuator(DeploymentState.from_plan(BASE))
    seen_routing = False
    for action in plan_actions(desired, fake.state()):
        asyncio.run(fake.apply(action))
        seen_routing |= action.kind is ActionKind.ROUTING
        if seen_routing:
            phases = {g.id: g.phase for g in fake.state().groups}
            assert all(phases[g] in (Phase.PREFILL, Phase.COLOCATED) for g in fake.state().routing.entry)
    assert matches(fake.state(), desired)


def test_dead_group_is_routed_around_then_dropped() -> None:
    desired = plan_of({"p0": "prefill", "p1": "prefill", "d0": "decode"},
                      entry={"p0": 0.5, "p1": 0.5}, kv={"p0": {"d0": 1.0}, "p1": {"d0": 1.0}})
    fake = FakeActuator(DeploymentState.from_plan(BASE))
    fake.kill("d1")
    done = run(desired, fake)
    assert [(a.kind, a.group) for a in done] == [(ActionKind.ROUTING, None), (ActionKind.DROP, "d1")]
    assert "d1" not in str(done[0].routing)
    assert matches(fake.state(), desired) and run(desired, fake) == []


def test_a_dead_group_the_plan_keeps_needs_a_restart_which_may_be_refused() -> None:
    fake = FakeActuator(DeploymentState.from_plan(BASE), refuse_starts=True)
    fake.kill("d1")
    done = run(BASE, fake)
    assert [(a.kind, a.group, a.status) for a in done] == [
        (ActionKind.RESTART, "d1", ActionStatus.REFUSED), (ActionKind.ROUTING, None, ActionStatus.APPLIED),
        (ActionKind.DROP, "d1", ActionStatus.APPLIED)]
    assert "cannot start group d1" in done[0].reason
    assert fake.state().routing == Routing(entry={"p0": 0.5, "p1": 0.5}, kv={"p0": {"d0": 1.0}, "p1": {"d0": 1.0}})
    again = run(BASE, fake)  # still refused, reported again; nothing else to do
    assert [(a.kind, a.status) for a in again] == [(ActionKind.START, ActionStatus.REFUSED)]


def test_start_and_restart_when_the_actuator_can() -> None:
    moved = plan_of({"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode", "n0": "decode"},
                    entry={"p0": 0.5, "p1": 0.5}, kv={"p0": {"d0": 0.5, "n0": 0.5}, "p1": {"d0": 0.5, "n0": 0.5}},
                    gpus={"d1": "n0:9", "n0": "n0:8"})
    fake = FakeActuator(DeploymentState.from_plan(BASE))
    done = run(moved, fake)
    assert [(a.kind, a.group) for a in done] == [(ActionKind.RESTART, "d1"), (ActionKind.START, "n0"),
                                                 (ActionKind.ROUTING, None)]
    assert fake.loads == {"d1": 1, "n0": 1} and matches(fake.state(), moved)
    assert run(moved, fake) == []


def test_refused_start_is_left_out_of_routing_and_reported() -> None:
    grown = plan_of({"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode", "x0": "colocated"},
                    entry={"p0": 0.25, "p1": 0.25, "x0": 0.5},
                    kv={"p0": {"d0": 0.5, "d1": 0.5}, "p1": {"d0": 0.5, "d1": 0.5}})
    fake = FakeActuator(DeploymentState.from_plan(BASE), refuse_starts=True)
    done = run(grown, fake)
    assert [(a.kind, a.status) for a in done] == [(ActionKind.START, ActionStatus.REFUSED)]
    assert fake.state().routing.entry == {"p0": 0.5, "p1": 0.5}  # x0 not routed to; the rest already right


def test_crash_half_way_then_resume_without_repeating_steps() -> None:
    desired = plan_of({"p0": "decode", "p1": "prefill", "d0": "decode", "d1": "prefill"},
                      entry={"p1": 0.5, "d1": 0.5}, kv={"p1": {"p0": 0.5, "d0": 0.5}, "d1": {"p0": 0.5, "d0": 0.5}})
    clean = FakeActuator(DeploymentState.from_plan(BASE))
    run(desired, clean)
    fake = FakeActuator(DeploymentState.from_plan(BASE), crash_after=1)
    with pytest.raises(RuntimeError, match="crashed"):
        run(desired, fake)
    assert len(fake.applied) == 1
    fake.crash_after = None
    resumed = run(desired, fake)
    assert len(resumed) == 2 and fake.applied == clean.applied  # same steps, none twice
    assert matches(fake.state(), desired) and run(desired, fake) == []


def test_a_step_without_effect_is_reported_not_repeated_forever() -> None:
    desired = BASE.model_copy(update={"groups": tuple(
        g.with_phase(Phase.COLOCATED) if g.id == "d1" else g for g in BASE.groups)})
    fake = FakeActuator(DeploymentState.from_plan(BASE), ignore=frozenset({ActionKind.FLIP}))
    done = run(desired, fake)
    assert [(a.kind, a.status) for a in done] == [(ActionKind.FLIP, ActionStatus.APPLIED),
                                                  (ActionKind.FLIP, ActionStatus.FAILED)]
    assert "did not change" in done[-1].reason


def test_effective_routing_renormalises_over_available_groups() -> None:
    r = effective_routing(BASE, {"p0", "d0", "d1"})
    assert r == Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 0.5, "d1": 0.5}})
    r = effective_routing(BASE, {"p0", "p1", "d0"})
    assert r.kv == {"p0": {"d0": 1.0}, "p1": {"d0": 1.0}}
    assert effective_routing(BASE, {"d0"}) == Routing()
    assert same_routing(Routing(entry={"a": 1.0, "b": 0.0}), Routing(entry={"a": 1.0 + 1e-12}))
    assert not same_routing(Routing(entry={"a": 1.0}), Routing(entry={"a": 0.5, "b": 0.5}))
