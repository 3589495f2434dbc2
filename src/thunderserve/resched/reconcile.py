"""Reconcile a running deployment toward a desired plan, step by step (idempotent, safe after a crash).

`plan_actions(desired, actual)` is the pure decision: the ordered steps that move `actual` (what runs now:
groups with their phase, layout and liveness, and the routing in force) to `desired`. `reconcile()` applies
them one at a time through an `Actuator`, re-reading the actual state after each step, so calling it again -
after a crash half-way, or with nothing left to do - only does what is still missing (no step twice once
actual == desired).

Rollout order (each step keeps every request servable):
    1. start       groups the desired plan has and nothing runs (the actuator may refuse: reported)
       restart     a running or dead group whose layout changed, or a dead group the plan keeps (same)
    2. flip        groups leaving the decode role, and prefill <-> colocated flips: new capacity to take
                   requests first (a worker always finishes what it holds; weights stay loaded)
    3. routing     the desired entry and KV shares, restricted to groups that run (or were started) and
                   renormalised; takes effect for new requests at once
    4. flip        groups entering the decode role, once routing sends them no new requests
    5. drop        groups the plan no longer has, once routing has moved away (dead ones are forgotten;
                   live ones drain, then stop; what they still hold is retried elsewhere)
A refused (re)start leaves that group out of the routing, and a refused restart drops the old instance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from thunderserve.plan.model import Phase, Plan, Routing, Stage

SHARE_TOLERANCE = 1e-9
MAX_STEPS = 64  # bound on steps per call (each group needs at most a few)


class ActionKind(StrEnum):
    START = "start"
    RESTART = "restart"
    FLIP = "flip"
    ROUTING = "routing"
    DROP = "drop"


class ActionStatus(StrEnum):
    PLANNED = "planned"
    APPLIED = "applied"
    REFUSED = "refused"  # the actuator cannot do it (e.g. start workers at runtime)
    FAILED = "failed"  # the actuator tried and it did not take effect


@dataclass(frozen=True)
class Action:
    """One step toward the desired plan (and, once applied, its outcome)."""

    kind: ActionKind
    group: str | None = None  # the group it acts on (None for routing)
    phase: Phase | None = None  # flip/start/restart: the phase it gets
    from_phase: Phase | None = None  # flip: the phase it had
    stages: tuple[Stage, ...] = ()  # start/restart: the layout to load
    routing: Routing | None = None  # routing: the shares to apply
    status: ActionStatus = ActionStatus.PLANNED
    reason: str = ""  # why it was refused or failed

    def describe(self) -> str:
        if self.kind is ActionKind.FLIP:
            return f"flip {self.group}: {self.from_phase} -> {self.phase}"
        if self.kind is ActionKind.ROUTING:
            r = self.routing or Routing()
            return f"routing: entry {_fmt(r.entry)}, kv {{{', '.join(f'{k}: {_fmt(v)}' for k, v in r.kv.items())}}}"
        if self.kind in (ActionKind.START, ActionKind.RESTART):
            gpus = [g for s in self.stages for g in s.gpus]
            return f"{self.kind} {self.group} as {self.phase} on {len(gpus)} GPU(s) ({', '.join(gpus)})"
        return f"drop {self.group}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "group": self.group, "status": str(self.status), "reason": self.reason,
                "detail": self.describe()}


def _fmt(shares: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:.3g}" for k, v in sorted(shares.items())) + "}"


@dataclass(frozen=True)
class GroupState:
    """One group as it runs now."""

    id: str
    phase: Phase
    stages: tuple[Stage, ...]
    alive: bool = True


@dataclass(frozen=True)
class DeploymentState:
    """What runs now: groups (dead ones until dropped) and the routing in force."""

    groups: tuple[GroupState, ...]
    routing: Routing = field(default_factory=Routing)

    def group(self, group_id: str) -> GroupState | None:
        return next((g for g in self.groups if g.id == group_id), None)

    @classmethod
    def from_plan(cls, plan: Plan, alive: Mapping[str, bool] | None = None) -> DeploymentState:
        """A deployment running `plan` exactly (every group alive unless `alive` says otherwise)."""
        live = alive or {}
        return cls(tuple(GroupState(g.id, g.phase, g.stages, live.get(g.id, True)) for g in plan.groups),
                   plan.routing or Routing())


class Actuator(Protocol):
    """The seam that applies actions to a deployment (the router and workers, or a fake)."""

    def state(self) -> DeploymentState:
        """The deployment as it runs now."""
        ...

    async def apply(self, action: Action) -> None:
        """Carry out one action; raise `ActionRefused` when this deployment cannot do it."""
        ...


class ActionRefused(Exception):
    """The actuator cannot carry out an action (its message says why)."""


# ---- the decision (pure) ---------------------------------------------------------------------------------
def _renormalised(shares: Mapping[str, float], keep: set[str]) -> dict[str, float]:
    kept = {g: float(v) for g, v in sorted(shares.items()) if g in keep and v > 0}
    total = sum(kept.values())
    return {g: v / total for g, v in kept.items()} if total > 0 else {}


def effective_routing(desired: Plan, available: set[str]) -> Routing:
    """The desired routing restricted to `available` groups (in their desired phase), renormalised."""
    routing = desired.routing or Routing()
    phases = {g.id: g.phase for g in desired.groups}
    takers = {g for g in available if phases.get(g) in (Phase.PREFILL, Phase.COLOCATED)}
    decoders = {g for g in available if phases.get(g) is Phase.DECODE}
    kv = {}
    for src, dests in sorted(routing.kv.items()):
        if src in available and phases.get(src) is Phase.PREFILL:
            shares = _renormalised(dests, decoders)
            if shares:
                kv[src] = shares
    return Routing(entry=_renormalised(routing.entry, takers), kv=kv)


def same_routing(a: Routing, b: Routing, tol: float = SHARE_TOLERANCE) -> bool:
    """Equal shares (within `tol`); a zero share equals a missing one."""
    def close(x: Mapping[str, float], y: Mapping[str, float]) -> bool:
        return all(math.isclose(x.get(k, 0.0), y.get(k, 0.0), abs_tol=tol) for k in set(x) | set(y))

    if not close(a.entry, b.entry):
        return False
    empty: dict[str, float] = {}
    return all(close(a.kv.get(k, empty), b.kv.get(k, empty)) for k in set(a.kv) | set(b.kv))


def plan_actions(desired: Plan, actual: DeploymentState, refused: frozenset[str] = frozenset()) -> list[Action]:
    """The ordered steps from `actual` to `desired`; [] when they already agree.

    `refused` names groups whose (re)start the actuator refused: they are neither started again nor
    routed to, and an old instance with another layout is dropped.
    """
    wanted = {g.id: g for g in desired.groups}
    starts: list[Action] = []
    lifts: list[Action] = []  # flips that must precede the routing change
    lowers: list[Action] = []  # flips into the decode role, after it
    drops: list[Action] = []
    available: set[str] = set()
    for gid, g in sorted(wanted.items()):
        cur = actual.group(gid)
        if cur is not None and cur.alive and cur.stages == g.stages:
            available.add(gid)
            if cur.phase is not g.phase:
                flip = Action(ActionKind.FLIP, gid, phase=g.phase, from_phase=cur.phase)
                (lowers if g.phase is Phase.DECODE else lifts).append(flip)
        elif gid in refused:
            if cur is not None:
                drops.append(Action(ActionKind.DROP, gid))
        else:
            kind = ActionKind.START if cur is None else ActionKind.RESTART
            starts.append(Action(kind, gid, phase=g.phase, stages=g.stages))
            available.add(gid)
    for cur in sorted(actual.groups, key=lambda c: c.id):
        if cur.id not in wanted:
            drops.append(Action(ActionKind.DROP, cur.id))
    actions = starts + lifts
    target = effective_routing(desired, available)
    if not same_routing(target, actual.routing):
        actions.append(Action(ActionKind.ROUTING, routing=target))
    return actions + lowers + drops


# ---- applying it ---------------------------------------------------------------------------------------
def _key(a: Action) -> tuple[Any, ...]:
    return (a.kind, a.group, a.phase, a.stages, a.routing.model_dump_json() if a.routing else None)


async def reconcile(desired: Plan, actual: DeploymentState, actuator: Actuator) -> list[Action]:
    """Apply `plan_actions` one step at a time (state re-read from the actuator after each); returns every
    step tried with its status. An exception from the actuator propagates (call again to resume)."""
    done: list[Action] = []
    refused: set[str] = set()
    applied: set[tuple[Any, ...]] = set()
    for _ in range(MAX_STEPS):
        todo = plan_actions(desired, actual, frozenset(refused))
        if not todo:
            break
        action = todo[0]
        if _key(action) in applied:  # applied, yet still wanted: it did not take effect
            done.append(replace(action, status=ActionStatus.FAILED,
                                reason="applied but the deployment did not change"))
            break
        try:
            await actuator.apply(action)
        except ActionRefused as exc:
            if action.group is None or action.kind not in (ActionKind.START, ActionKind.RESTART):
                done.append(replace(action, status=ActionStatus.FAILED, reason=str(exc)))
                break
            refused.add(action.group)
            done.append(replace(action, status=ActionStatus.REFUSED, reason=str(exc)))
        else:
            applied.add(_key(action))
            done.append(replace(action, status=ActionStatus.APPLIED))
        actual = actuator.state()
    return done
