"""The re-scheduling controller of a running deployment: detect, decide, reconcile (an asyncio task).

Controller lifecycle (one per API server, started and stopped by its lifespan):
    observe   a `WorkloadMonitor` fed by request: every `tick_s` the deployment's accepted, unfinished requests
              (`in_flight`: arrival, prompt, tokens so far) join the window as they arrive, and the router
              reports each one's end (`observe`); output lengths are Kaplan-Meier over finished and in-flight
              requests, so after a shift long answers count before they finish (the simulator's monitor is
              fed the same way). Worker liveness (transport errors and heartbeat timeouts, detected by the
              router) is read from the actuator's state every `tick_s`
    detect    `ReschedDecider` (pure, clock passed in): a group that died since the last look is a failure
              of its GPUs; otherwise, once `warmup_s` of observations gave a baseline, `ShiftTrigger` says
              when the workload drifted (hysteresis: hold, cooldown, re-arm)
    decide    the lightweight re-plan (`resched.replan.lightweight_replan`) of the target plan on the
              cluster minus every GPU lost so far, for the observed workload (or the last one planned for);
              it runs in a thread, so serving goes on. If it fails, `survivor_plan` keeps the surviving
              groups and renormalises their routing, so a dead group always leaves the routing
    reconcile `reconcile()` moves the deployment to the new target step by step (flips, routing, drops;
              (re)starts may be refused and are reported); the target and the record are kept. If it
              raises half-way, the next tick calls it again toward the same target (it is idempotent)
Admin requests (`replan_event`, `replan_to`) take the same path under the same lock, so one decision is
applied at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from thunderserve.plan.model import Phase, Plan, Routing
from thunderserve.resched.events import (
    EventKind,
    ReschedEvent,
    cluster_with_added,
    cluster_without,
    event_workload,
    failed_gpus,
)
from thunderserve.resched.monitor import DEFAULT_WINDOW_S, InFlight, WorkloadEstimate, WorkloadMonitor
from thunderserve.resched.reconcile import Action, Actuator, DeploymentState, effective_routing, reconcile
from thunderserve.resched.replan import Change, ReplanResult, diff_plans, lightweight_replan
from thunderserve.resched.trigger import COOLDOWN_S, ENTER_DRIFT, EXIT_DRIFT, HOLD_S, ShiftTrigger
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

log = logging.getLogger("thunderserve.resched")

ReplanFn = Callable[[Plan, Cluster, ModelSpec, WorkloadSpec, SloSpec], ReplanResult]


@dataclass(frozen=True)
class ControllerConfig:
    tick_s: float = 0.5  # how often liveness and the workload are looked at
    monitor_window_s: float = DEFAULT_WINDOW_S  # sliding window of the workload estimate
    warmup_s: float = 30.0  # observe this long before the estimate becomes the workload baseline
    watch_workload: bool = True  # re-plan on workload shifts (failures are always handled)
    enter_drift: float = ENTER_DRIFT
    exit_drift: float = EXIT_DRIFT
    hold_s: float = HOLD_S
    cooldown_s: float = COOLDOWN_S


@dataclass(frozen=True)
class ReplanContext:
    """The facts a re-plan needs besides the plan."""

    cluster: Cluster  # the cluster the deployment was planned on (before any failure)
    model: ModelSpec
    slo: SloSpec
    workload: WorkloadSpec  # planned for until the monitor has observed enough requests


@dataclass(frozen=True)
class Decision:
    """Why to re-plan and with what; at most one of workload / plan / added_path is set."""

    cause: str  # "fail:d1", "workload shift", "admin: fail:local:3", ...
    lost_gpus: frozenset[str] = frozenset()  # GPUs to leave out from now on
    workload: WorkloadSpec | None = None  # plan for this workload (None: the observed or last one)
    observe_workload: bool = False  # a detected shift: plan for the monitor's window
    plan: Plan | None = None  # an explicit target (no re-planning)
    added_path: str | None = None  # an `add:` event: node YAML whose GPUs join


@dataclass(frozen=True)
class ControlRecord:
    """One decision and what applying it did."""

    cause: str
    decided_at_s: float  # controller clock
    path: str  # "lightweight" | "survivors" (re-plan failed) | "explicit" (admin plan) | "none" (nothing survives)
    decision_time_s: float
    target: Plan
    changes: tuple[Change, ...]
    actions: tuple[Action, ...]
    error: str = ""  # why the re-plan failed (path "survivors")

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.cause, "decided_at_s": self.decided_at_s, "path": self.path,
                "decision_time_s": self.decision_time_s, "target": self.target.to_dict(),
                "changes": [{"kind": c.kind, "group": c.group, "detail": c.detail,
                             "reloads_weights": c.reloads_weights} for c in self.changes],
                "actions": [a.to_dict() for a in self.actions], "error": self.error}


class ControlledDeployment(Actuator, Protocol):
    """What the controller drives: an actuator that also shows the running plan and its unfinished requests,
    and records the target."""

    def record_target(self, plan: Plan) -> None: ...

    def running_plan(self) -> Plan: ...

    def in_flight(self) -> Mapping[str, InFlight]: ...


# ---- decisions (pure) ---------------------------------------------------------------------------------
class ReschedDecider:
    """Detection state: which failures were handled, and the workload shift trigger (time passed in)."""

    def __init__(self, config: ControllerConfig = ControllerConfig()) -> None:
        self.config = config
        self.handled: set[str] = set()  # dead groups already answered
        self.trigger: ShiftTrigger | None = None
        self._observing_since_s: float | None = None

    def observe(self, now_s: float, actual: DeploymentState, estimate: WorkloadEstimate | None
                ) -> Decision | None:
        """The decision to take now, if any: failures first, then a workload shift."""
        self.handled -= {g.id for g in actual.groups if g.alive}  # a restarted group can fail again
        dead = sorted(g.id for g in actual.groups if not g.alive and g.id not in self.handled)
        if dead:
            self.handled |= set(dead)
            lost = frozenset(gpu for g in actual.groups if g.id in dead for s in g.stages for gpu in s.gpus)
            return Decision("fail:" + ",".join(dead), lost_gpus=lost)
        if not self.config.watch_workload or estimate is None:
            return None
        if self._observing_since_s is None:
            self._observing_since_s = now_s
        if self.trigger is None:
            if now_s - self._observing_since_s >= self.config.warmup_s:
                self.trigger = self._new_trigger(estimate)
            return None
        if self.trigger.update(now_s, estimate):
            return Decision("workload shift", observe_workload=True)
        return None

    def settle(self) -> None:
        """After a re-plan, completions are skewed for a while (retries, flips): restart the hold timer."""
        if self.trigger is not None:
            fresh = self._new_trigger(self.trigger.baseline)
            fresh._quiet_until = self.trigger._quiet_until
            fresh._armed = self.trigger._armed
            self.trigger = fresh

    def _new_trigger(self, baseline: WorkloadEstimate) -> ShiftTrigger:
        c = self.config
        return ShiftTrigger(baseline=baseline, enter_drift=c.enter_drift, exit_drift=c.exit_drift,
                            hold_s=c.hold_s, cooldown_s=c.cooldown_s)


def survivor_plan(plan: Plan, alive_gpus: set[str]) -> Plan:
    """The plan's groups whose GPUs all survive, routing restricted to them and renormalised (no LP).

    If no group is left to take requests, the surviving decode groups become colocated.
    """
    groups = [g for g in plan.groups if set(g.gpus) <= alive_gpus]
    if not groups:
        raise ValueError("no group of the plan survives")
    if not any(g.takes_requests for g in groups):
        groups = [g.with_phase(Phase.COLOCATED) for g in groups]
        routing = Routing(entry={g.id: 1.0 / len(groups) for g in groups})
        return plan.model_copy(update={"groups": tuple(groups), "routing": routing, "estimate": {}})
    kept = plan.model_copy(update={"groups": tuple(groups)})
    routing = effective_routing(kept, {g.id for g in groups})
    if not routing.entry:  # surviving takers all had zero share: spread evenly
        takers = [g.id for g in groups if g.takes_requests]
        routing = routing.model_copy(update={"entry": {g: 1.0 / len(takers) for g in takers}})
    return kept.model_copy(update={"routing": routing, "estimate": {}})


# ---- the driver ---------------------------------------------------------------------------------------
class ReschedController:
    """Runs detection -> decision -> reconcile against a deployment (see the module docstring)."""

    def __init__(self, deployment: ControlledDeployment, plan: Plan, context: ReplanContext,
                 config: ControllerConfig = ControllerConfig(), *, clock: Callable[[], float] = time.monotonic,
                 replan: ReplanFn = lightweight_replan) -> None:
        self.deployment = deployment
        self.target = plan  # what the deployment converges to
        self.context = context
        self.config = config
        self.clock = clock
        self._replan = replan
        self.cluster = context.cluster  # as known now: added nodes in, lost GPUs out (see `known_cluster`)
        self.lost_gpus: set[str] = set()
        self.workload = context.workload  # the workload the target was planned for
        self.monitor = WorkloadMonitor(config.monitor_window_s)
        self._tracked: set[str] = set()  # unfinished requests whose arrival the monitor has
        self._produced: dict[str, int] = {}  # tokens so far of the unfinished ones, as last sampled
        self.decider = ReschedDecider(config)
        self.history: list[ControlRecord] = []
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._interrupted = False  # the last reconcile raised half-way; the next tick resumes it
        deployment.record_target(plan)

    # ---- inputs -------------------------------------------------------------------------------------
    def observe(self, record: Any) -> None:
        """Router observer: a request ended. A finished one's output length is known; a failed or cancelled
        one stays censored in the window (its answer's length is unknown)."""
        rid = str(record.request_id)
        tracked = rid in self._tracked
        self._tracked.discard(rid)
        self._produced.pop(rid, None)
        if getattr(record, "outcome", None) != "finished":
            return
        if not tracked:  # arrived and finished between two samples
            self.monitor.observe_arrival(float(record.arrival_s), int(record.prompt_tokens), request=rid)
        self.monitor.observe_completion(float(record.finish_s), int(record.completion_tokens), request=rid)

    def sample_in_flight(self) -> dict[str, int]:
        """Feed the monitor the requests that arrived since the last sample; tokens so far of every unfinished
        one (the censoring bounds of the output-length estimate)."""
        snapshot = self.deployment.in_flight()
        new = sorted(((rid, f) for rid, f in snapshot.items() if rid not in self._tracked),
                     key=lambda item: item[1].arrival_s)
        for rid, f in new:
            self.monitor.observe_arrival(f.arrival_s, f.prompt_tokens, request=rid)
            self._tracked.add(rid)
        self._produced = {rid: f.completion_tokens for rid, f in snapshot.items()}
        return self._produced

    @property
    def known_cluster(self) -> Cluster:
        return cluster_without(self.cluster, self.lost_gpus)

    # ---- the loop -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="resched-controller")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the controller must outlive one bad decision
                log.exception("re-scheduling tick failed")
            await asyncio.sleep(self.config.tick_s)

    async def tick(self) -> ControlRecord | None:
        """Look once; decide and reconcile if something changed. Returns the record of what was done."""
        async with self._lock:
            now = self.clock()
            estimate = self.monitor.estimate(now, self.sample_in_flight())
            decision = self.decider.observe(now, self.deployment.state(), estimate)
            if decision is None:
                if not self._interrupted:
                    return None
                decision = Decision("resume", plan=self.target)  # the last reconcile crashed: finish it
            log.warning("re-scheduling: %s", decision.cause)
            return await self._execute(decision)

    # ---- admin --------------------------------------------------------------------------------------
    async def replan_event(self, event: ReschedEvent) -> ControlRecord:
        """Act on an event as if it had been detected (fail / add / workload)."""
        async with self._lock:
            cause = f"admin: {event.describe()}"
            if event.kind is EventKind.FAIL:
                decision = Decision(cause, lost_gpus=frozenset(failed_gpus(self.known_cluster, event)))
            elif event.kind is EventKind.WORKLOAD:
                decision = Decision(cause, workload=await asyncio.to_thread(event_workload, event))
            else:
                decision = Decision(cause, added_path=event.add_path)
            return await self._execute(decision)

    async def replan_to(self, plan: Plan) -> ControlRecord:
        """Reconcile toward an explicit plan (no re-planning)."""
        async with self._lock:
            return await self._execute(Decision("admin: plan", plan=plan))

    # ---- decide and apply ---------------------------------------------------------------------------
    async def _execute(self, decision: Decision) -> ControlRecord:
        now = self.clock()
        self.lost_gpus |= decision.lost_gpus
        added: frozenset[str] = frozenset()
        if decision.added_path is not None:
            before = set(self.cluster.by_id)
            self.cluster = await asyncio.to_thread(cluster_with_added, self.cluster, decision.added_path)
            added = frozenset(self.cluster.by_id) - before
        cluster = self.known_cluster
        error = ""
        start = time.perf_counter()
        if decision.plan is not None:
            path, desired = "explicit", decision.plan
            changes = self._diff(self.target, desired, cluster)
        else:
            workload = decision.workload or (self.monitor.as_workload(now, "observed", self._produced)
                                             if decision.observe_workload or decision.lost_gpus else None) \
                or self.workload
            try:
                result = await asyncio.to_thread(self._call_replan, cluster, workload, added)
                path, desired, changes = "lightweight", result.plan, list(result.changes)
                self.workload = workload
            except Exception as exc:  # noqa: BLE001 - a failed re-plan must still drop dead groups
                error = f"{type(exc).__name__}: {exc}"
                log.error("re-plan failed (%s); keeping the surviving groups", error)
                path = "survivors"
                try:
                    desired = survivor_plan(self.target, {g.id for g in cluster.gpus})
                except ValueError:  # nothing survives: nothing to reconcile, the API answers 503 meanwhile
                    return self._nothing_survives(decision, now, time.perf_counter() - start)
                changes = self._diff(self.target, desired, cluster)
        decision_s = time.perf_counter() - start
        self.deployment.record_target(desired)
        self.target = desired
        try:
            actions = await reconcile(desired, self.deployment.state(), self.deployment)
            self._interrupted = False
        except Exception as exc:  # noqa: BLE001 - recorded; reconcile is idempotent, the next tick resumes
            log.exception("reconcile toward the new plan failed half-way")
            error = f"reconcile interrupted: {type(exc).__name__}: {exc}"
            actions, self._interrupted = [], True
        self.decider.settle()
        record = ControlRecord(decision.cause, now, path, decision_s, desired, tuple(changes), tuple(actions),
                               error)
        self.history.append(record)
        for a in actions:
            log.warning("re-scheduling %s: %s [%s]%s", decision.cause, a.describe(), a.status,
                        f" {a.reason}" if a.reason else "")
        return record

    def _nothing_survives(self, decision: Decision, now: float, decision_s: float) -> ControlRecord:
        """Every group of the plan lost its GPUs: record it (one log line, no traceback) and keep the target,
        so that workers coming back can be reconciled toward it."""
        error = "no group of the plan survives: no worker can serve until GPUs come back"
        log.error("re-scheduling %s: %s", decision.cause, error)
        self.decider.settle()
        record = ControlRecord(decision.cause, now, "none", decision_s, self.target, (), (), error)
        self.history.append(record)
        return record

    def _call_replan(self, cluster: Cluster, workload: WorkloadSpec, added: frozenset[str]) -> ReplanResult:
        ctx = self.context
        if added:
            return lightweight_replan(self.target, cluster, ctx.model, workload, ctx.slo, added_gpus=added)
        return self._replan(self.target, cluster, ctx.model, workload, ctx.slo)

    def _diff(self, old: Plan, new: Plan, cluster: Cluster) -> list[Change]:
        try:
            return diff_plans(old, new, self.context.model, cluster)
        except Exception:  # noqa: BLE001 - GPUs the cost model cannot price: the actions still say it all
            return []
