"""Reconcile invariants over random deployments (hypothesis): converges, then does nothing; new requests are
only ever routed to live groups that take requests; refused starts never leave a half-done deployment."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from thunderserve.plan import Group, Phase, Plan, Routing, Stage
from thunderserve.resched.actuator import FakeActuator
from thunderserve.resched.reconcile import (
    ActionKind,
    ActionStatus,
    DeploymentState,
    GroupState,
    effective_routing,
    reconcile,
    same_routing,
)

IDS = ("a", "b", "c", "d", "e")
PHASES = (Phase.PREFILL, Phase.DECODE, Phase.COLOCATED)


def stages(gid: str, moved: bool) -> tuple[Stage, ...]:
    return (Stage(gpus=(f"{'m' if moved else 'n'}{gid}:0",), layers=(0, 2)),)


@st.composite
def scenario(draw: st.DrawFn) -> tuple[DeploymentState, Plan]:
    actual_ids = draw(st.lists(st.sampled_from(IDS), min_size=1, unique=True))
    groups = tuple(GroupState(g, draw(st.sampled_from(PHASES)), stages(g, False), draw(st.booleans()))
                   for g in sorted(actual_ids))
    takers = [g.id for g in groups if g.phase is not Phase.DECODE]
    actual = DeploymentState(groups, Routing(entry={g: 1.0 / len(takers) for g in takers}))
    desired_ids = draw(st.lists(st.sampled_from(IDS), min_size=1, unique=True))
    desired_groups = tuple(Group(id=g, phase=draw(st.sampled_from(PHASES)), stages=stages(g, draw(st.booleans())))
                           for g in sorted(desired_ids))
    entry = {g.id: draw(st.floats(0.1, 1.0)) for g in desired_groups if g.phase is not Phase.DECODE}
    decoders = [g.id for g in desired_groups if g.phase is Phase.DECODE]
    kv = {g.id: {d: draw(st.floats(0.1, 1.0)) for d in decoders}
          for g in desired_groups if g.phase is Phase.PREFILL and decoders}
    desired = Plan(model="toy", cluster="test", groups=desired_groups, routing=Routing(entry=entry, kv=kv))
    return actual, desired


def check_routable(state: DeploymentState) -> None:
    groups = {g.id: g for g in state.groups}
    for gid in state.routing.entry:
        assert gid in groups and groups[gid].alive and groups[gid].phase is not Phase.DECODE, (gid, state)
    for src, dests in state.routing.kv.items():
        assert src in groups and groups[src].alive
        assert all(d in groups and groups[d].alive for d in dests)


class CheckingActuator(FakeActuator):
    """A fake that checks, after each routing change and after, that routing only names live takers."""

    async def apply(self, action):  # type: ignore[no-untyped-def]
        await super().apply(action)
        if any(a.kind is ActionKind.ROUTING for a in self.applied):
            check_routable(self.deployment)


@settings(max_examples=150, deadline=None)
@given(scenario())
def test_reconcile_converges_and_is_then_idempotent(case: tuple[DeploymentState, Plan]) -> None:
    actual, desired = case
    fake = CheckingActuator(actual)
    done = asyncio.run(reconcile(desired, fake.state(), fake))
    assert all(a.status is ActionStatus.APPLIED for a in done)
    state = fake.state()
    assert {(g.id, g.phase, g.stages, g.alive) for g in state.groups} == \
        {(g.id, g.phase, g.stages, True) for g in desired.groups}
    assert same_routing(state.routing, effective_routing(desired, {g.id for g in desired.groups}))
    assert asyncio.run(reconcile(desired, fake.state(), fake)) == []
    restarted = {a.group for a in done if a.kind in (ActionKind.START, ActionKind.RESTART)}
    assert restarted == {g.id for g in desired.groups
                         if (cur := actual.group(g.id)) is None or not cur.alive or cur.stages != g.stages}


@settings(max_examples=150, deadline=None)
@given(scenario())
def test_refused_starts_leave_only_live_wanted_groups(case: tuple[DeploymentState, Plan]) -> None:
    actual, desired = case
    fake = CheckingActuator(actual, refuse_starts=True)
    done = asyncio.run(reconcile(desired, fake.state(), fake))
    refused = {a.group for a in done if a.status is ActionStatus.REFUSED}
    assert all(a.status is ActionStatus.APPLIED for a in done if a.group not in refused or a.kind is ActionKind.DROP)
    wanted = {g.id: g for g in desired.groups}
    for g in fake.state().groups:  # every remaining group is live, wanted and laid out as wanted
        assert g.alive and g.id in wanted and g.stages == wanted[g.id].stages and g.phase is wanted[g.id].phase
    assert not refused & {g.id for g in fake.state().groups}
    again = asyncio.run(reconcile(desired, fake.state(), fake))
    assert all(a.kind is ActionKind.START and a.status is ActionStatus.REFUSED for a in again)
    assert {a.group for a in again} == refused
