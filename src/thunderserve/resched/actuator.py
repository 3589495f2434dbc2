"""Actuators: what applies reconcile's actions - over the live router and workers, or an in-memory fake.

`RouterActuator` drives a running deployment through its `Router`: a flip is a live `set_role` (the worker
keeps its weights and finishes what it holds), routing is `update_routing` (new requests at once, KV shares
at every worker between steps, and requests queued unstarted at entry workers routed again by the new shares,
as the simulator's re-route does), a drop takes the group out (a live worker drains up to `drain_timeout_s`,
then stops; what it still holds is retried elsewhere by the router). Starting workers for a new layout at
runtime is not something this deployment can do: (re)starts are refused, and reconcile reports them. (A dead
worker of an unchanged group is restarted by supervision, `runtime.launch.supervisor`, not by reconcile: while
that is under way, or while a late worker may still answer, the group counts as alive here.)

`FakeActuator` holds a `DeploymentState` in memory with the same semantics (and can refuse starts or crash
after N steps), so reconcile and the controller are tested without processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from thunderserve.plan.model import Plan, Routing
from thunderserve.resched.monitor import InFlight
from thunderserve.resched.reconcile import Action, ActionKind, ActionRefused, DeploymentState, GroupState

if TYPE_CHECKING:
    from thunderserve.runtime.frontend import Frontend

DEFAULT_DRAIN_TIMEOUT_S = 30.0


class RouterActuator:
    """Applies actions to the deployment behind `router` (runs in the router's event loop)."""

    def __init__(self, router: Frontend, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> None:
        self.router = router
        self.drain_timeout_s = drain_timeout_s

    def state(self) -> DeploymentState:
        plan = self.router.plan
        # a late worker (may answer again) or one being restarted (see `launch.supervisor`) is not a failure yet:
        # the router routes around it meanwhile, and re-admits it into the same group and role
        alive = {w.group_id: w.alive or w.late or w.restarting for w in self.router.workers()}
        return DeploymentState(tuple(GroupState(g.id, g.phase, g.stages, alive.get(g.id, False))
                                     for g in plan.groups), plan.routing or Routing())

    async def apply(self, action: Action) -> None:
        if action.kind is ActionKind.FLIP:
            assert action.group is not None and action.phase is not None
            await self.router.set_role(action.group, action.phase)
        elif action.kind is ActionKind.ROUTING:
            assert action.routing is not None
            await self.router.update_routing(action.routing, rebalance=True)
        elif action.kind is ActionKind.DROP:
            assert action.group is not None
            try:
                await self.router.remove_group(action.group, self.drain_timeout_s)
            except ValueError as exc:
                raise ActionRefused(str(exc)) from None
        else:
            raise ActionRefused(f"group {action.group} needs a new worker ({action.describe()}); this "
                                "deployment cannot start workers while serving")

    def record_target(self, plan: Plan) -> None:
        """The plan being converged to: its estimate is shown with the running plan."""
        self.router.set_estimate(plan.estimate)

    def running_plan(self) -> Plan:
        return self.router.plan

    def in_flight(self) -> Mapping[str, InFlight]:
        """Accepted, unfinished requests (the workload monitor counts their outputs as censored)."""
        return self.router.in_flight()


@dataclass
class FakeActuator:
    """An in-memory deployment: applies actions to `deployment` and records them.

    `refuse_starts` refuses (re)starts like `RouterActuator`; `crash_after` raises RuntimeError on the step
    after that many were applied (a controller dying half-way); `ignore` names kinds applied with no effect.
    `loads[group]` counts weight loads (1 per start/restart): flips and routing never load.
    """

    deployment: DeploymentState
    refuse_starts: bool = False
    crash_after: int | None = None
    ignore: frozenset[ActionKind] = frozenset()
    applied: list[Action] = field(default_factory=list)
    loads: dict[str, int] = field(default_factory=dict)
    target: Plan | None = None
    requests: dict[str, InFlight] = field(default_factory=dict)  # what `in_flight` shows (tests set it)

    def state(self) -> DeploymentState:
        return self.deployment

    async def apply(self, action: Action) -> None:
        if self.crash_after is not None and len(self.applied) >= self.crash_after:
            raise RuntimeError(f"actuator crashed before {action.describe()}")
        if action.kind in (ActionKind.START, ActionKind.RESTART) and self.refuse_starts:
            raise ActionRefused(f"cannot start group {action.group}")
        self.applied.append(action)
        if action.kind in self.ignore:
            return
        groups = {g.id: g for g in self.deployment.groups}
        routing = self.deployment.routing
        gid = action.group
        if action.kind is ActionKind.FLIP:
            assert gid is not None and action.phase is not None
            groups[gid] = replace(groups[gid], phase=action.phase)
        elif action.kind in (ActionKind.START, ActionKind.RESTART):
            assert gid is not None and action.phase is not None
            groups[gid] = GroupState(gid, action.phase, action.stages, True)
            self.loads[gid] = self.loads.get(gid, 0) + 1
        elif action.kind is ActionKind.ROUTING:
            assert action.routing is not None
            routing = action.routing
        elif action.kind is ActionKind.DROP:
            assert gid is not None
            groups.pop(gid, None)
        self.deployment = DeploymentState(tuple(groups[g] for g in sorted(groups)), routing)

    def kill(self, group_id: str) -> None:
        """The group's worker dies (it stays in the deployment, dead, until dropped)."""
        self.deployment = replace(self.deployment, groups=tuple(
            replace(g, alive=False) if g.id == group_id else g for g in self.deployment.groups))

    def record_target(self, plan: Plan) -> None:
        self.target = plan

    def in_flight(self) -> Mapping[str, InFlight]:
        return dict(self.requests)

    def running_plan(self) -> Plan:
        """The fake's state as a plan (model and cluster of the last target)."""
        from thunderserve.plan.model import Group

        base = self.target
        assert base is not None, "no target recorded yet"
        groups = tuple(Group(id=g.id, phase=g.phase, stages=g.stages) for g in self.deployment.groups)
        return base.model_copy(update={"groups": groups, "routing": self.deployment.routing})
