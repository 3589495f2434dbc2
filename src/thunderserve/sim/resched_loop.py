"""The rescheduler in the simulation loop: timed events hit a `DynamicReplay`; a policy detects, decides and
applies in virtual time (see `sim.timeline` for the policies and the modelling choices).

Controller lifecycle (one per policy run):
    tick every `tick_s`: live GPUs heartbeat; GPUs silent for `heartbeat_timeout_s` are declared dead
    (router sweep, then a re-plan if the plan used them); the workload monitor's estimate feeds the shift
    trigger -> re-plan request -> decide (the plan is computed at once; the decision ends after the measured
    or fixed decision time, the old plan serving meanwhile) -> apply (lightweight: stage 1, drops, loads
    and flips into entry roles, with a routing for the groups keeping their role; stage 2, once those serve,
    flips into decode and the new routing; each re-route hands queued, unstarted requests out again. Full:
    a restart, every group back after its apply time) -> next queued request, if any.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from thunderserve.errors import PlanError, SpecError
from thunderserve.plan import Phase, Plan, Routing
from thunderserve.resched.events import (
    EventKind,
    ReschedEvent,
    cluster_with_added,
    cluster_without,
    failed_gpus,
)
from thunderserve.resched.monitor import HeartbeatTracker, WorkloadEstimate, WorkloadMonitor
from thunderserve.resched.reconcile import effective_routing
from thunderserve.resched.replan import Change, ReplanResult, full_replan, lightweight_replan
from thunderserve.resched.trigger import ShiftTrigger
from thunderserve.scheduler.api import orchestrate
from thunderserve.sim.config import SimConfig
from thunderserve.sim.dynamic import DynamicReplay
from thunderserve.sim.kernel import PRIORITY_ARRIVAL, PRIORITY_DECIDE
from thunderserve.sim.replay import _Requests
from thunderserve.sim.timeline_types import (
    Detection,
    LogEntry,
    PolicyRun,
    ReplanRecord,
    RequestStream,
    ReschedPolicy,
    TimelineConfig,
)
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec


@dataclass
class _Pending:
    cause: str
    event_s: float
    detected_s: float
    workload: WorkloadSpec | None = None  # a shift: the observed workload to re-plan for
    added: frozenset[str] = frozenset()
    rate_rps: float | None = None  # the observed request rate at detection (None: not known yet)


@dataclass
class _Record:
    """A re-plan being carried out (frozen into a ReplanRecord at the end)."""

    pending: _Pending
    path: str
    decision_start_s: float
    decision_time_s: float
    result: ReplanResult
    decision_wall_s: float = float("nan")
    applied_s: float = float("nan")
    waiting_for: set[str] = field(default_factory=set)
    ready_s: float = float("nan")
    lost: int = 0
    # staged rollout: flips into the decode role wait for these groups (their new entry roles) to serve
    stage1: set[str] = field(default_factory=set)
    stage2: list[Change] | None = None  # None: nothing pending


class _Controller:
    def __init__(self, replay: DynamicReplay, policy: ReschedPolicy, plan: Plan, cluster: Cluster,
                 model: ModelSpec, slo: SloSpec, workload: WorkloadSpec, rate_rps: float,
                 events: list[ReschedEvent], resolved: dict[str, WorkloadSpec], config: TimelineConfig,
                 last_arrival_s: float) -> None:
        self.replay = replay
        self.loop = replay.loop
        self.policy = policy
        self.plan = plan  # the target plan (what the deployment is converging to)
        self.known = cluster  # the cluster as the controller knows it (detected failures removed)
        self.model = model
        self.slo = slo
        self.workload = workload  # the workload the target plan was made for
        self.config = config
        self.events = events
        self.resolved = resolved
        self.last_arrival_s = last_arrival_s
        self.failed: set[str] = set()  # GPUs physically down
        self.known_failed: set[str] = set()
        self.fail_time: dict[str, float] = {}
        self.tracker = HeartbeatTracker(config.heartbeat_timeout_s)
        self.monitor = WorkloadMonitor(config.monitor_window_s)  # feeds the shift trigger
        self.recent = WorkloadMonitor(config.plan_window_s)  # the workload a shift re-plan targets
        baseline = WorkloadEstimate(rate_rps, workload.mean_prompt_tokens, workload.mean_output_tokens, 0, 0)
        self.trigger = self._new_trigger(baseline)
        self.watch_from_s = config.watch_after_s  # the trigger ignores estimates before this time
        self.queue: deque[_Pending] = deque()
        self.deciding = False
        self.records: list[_Record] = []
        self.detections: list[Detection] = []
        self.log: list[LogEntry] = []
        self.last_shift_s = float("nan")
        self.shift_pending = False
        replay.on_arrival = self._on_arrival
        replay.on_finish = self._on_finish
        replay.on_state = self._on_state

    def _new_trigger(self, baseline: WorkloadEstimate) -> ShiftTrigger:
        cfg = self.config
        cooldown = cfg.full_cooldown_s if self.policy is ReschedPolicy.FULL else cfg.light_cooldown_s
        return ShiftTrigger(baseline=baseline, attainment_target=self.slo.attainment_target,
                            enter_drift=cfg.enter_drift, exit_drift=cfg.exit_drift, hold_s=cfg.hold_s,
                            cooldown_s=cooldown)

    def _settle(self) -> None:
        """After a disruption (requests lost and retried, a restart) completions are skewed for a while:
        the trigger starts afresh (same baseline) once `watch_after_s` has passed."""
        self.watch_from_s = max(self.watch_from_s, self.loop.now_s + self.config.watch_after_s)
        self.trigger = self._new_trigger(self.trigger.baseline)

    def note(self, kind: str, detail: str) -> None:
        self.log.append(LogEntry(self.loop.now_s, kind, detail))

    # -- observations ------------------------------------------------------------------------------------
    def _on_arrival(self, r: int, now: float) -> None:
        self.monitor.observe_arrival(now, self.replay.req.prompt[r], request=r)
        self.recent.observe_arrival(now, self.replay.req.prompt[r], request=r)

    def _on_finish(self, r: int, now: float) -> None:
        self.monitor.observe_completion(now, self.replay.req.output[r], request=r)
        self.recent.observe_completion(now, self.replay.req.output[r], request=r)

    def _on_state(self, gid: str, state: str, now: float) -> None:
        if state != "active" or now <= 0:
            return
        self.note("ready", f"group {gid} serves as {self.replay.objects[gid].group.phase.value}")
        for rec in self.records:
            if gid in rec.stage1:
                rec.stage1.discard(gid)
                if not rec.stage1:  # as its own event, not inside the replay's state change
                    self.loop.schedule(now, PRIORITY_DECIDE, self._stage2, rec)
            if gid in rec.waiting_for:
                rec.waiting_for.discard(gid)
                if not rec.waiting_for:
                    rec.ready_s = now

    # -- timed events -----------------------------------------------------------------------------------
    def start(self) -> None:
        for ev in self.events:
            assert ev.at_s is not None
            self.loop.schedule(ev.at_s, PRIORITY_ARRIVAL, self._event, ev)
        self.loop.schedule(0.0, PRIORITY_DECIDE, self._tick, None)

    def _event(self, ev: ReschedEvent) -> None:
        now = self.loop.now_s
        self.note("event", ev.describe())
        if ev.kind is EventKind.FAIL:
            gpus = failed_gpus(self.replay.cluster, ev) - self.failed
            self.failed |= gpus
            for g in gpus:
                self.fail_time[g] = now
            hit = self.replay.fail_gpus(gpus)
            self.note("fail", f"{len(gpus)} GPU(s) down; groups stopped: {', '.join(hit) or 'none'}")
        elif ev.kind is EventKind.WORKLOAD:
            self.last_shift_s = now
            self.shift_pending = True
        else:
            assert ev.add_path is not None
            before = set(self.replay.cluster.by_id)
            self.replay.cluster = cluster_with_added(self.replay.cluster, ev.add_path)
            grown = cluster_with_added(self.known, ev.add_path)
            added = frozenset(grown.by_id) - frozenset(before)
            self.known = grown
            self.detections.append(Detection("add", now, now, f"{len(added)} GPU(s) registered"))
            if self.policy is not ReschedPolicy.NONE and added:
                self._request(_Pending(ev.describe(), now, now, added=added))

    # -- the periodic tick ------------------------------------------------------------------------------
    def _tick(self, _: object) -> None:
        now = self.loop.now_s
        for gpu in self.replay.cluster.by_id:
            if gpu not in self.failed:
                self.tracker.beat(gpu, now)
        dead = sorted(set(self.tracker.dead(now)) - self.known_failed)
        if dead:
            self._failure_detected(dead)
        # Arrivals ending is the end of the experiment, not a workload shift: the trigger stops with them.
        watching = self.policy is not ReschedPolicy.NONE and self.watch_from_s <= now <= self.last_arrival_s
        progress = self.replay.progress() if watching else {}  # tokens so far of unfinished requests
        estimate = self.monitor.estimate(now, progress) if watching else None
        if watching and self.trigger.update(now, estimate):
            observed = (self.recent.as_workload(now, "observed", progress)
                        or self.monitor.as_workload(now, "observed", progress))
            seen = self.recent.estimate(now, progress) or estimate
            assert seen is not None and observed is not None
            event_s = self.last_shift_s if self.shift_pending else now
            self.shift_pending = False
            self.detections.append(Detection(
                "shift", event_s, now, f"mean prompt {seen.mean_prompt_tokens:.0f}, "
                f"mean output {seen.mean_output_tokens:.0f} tokens, {seen.rate_rps:.2f} req/s"))
            self.note("detect", f"workload shift ({self.detections[-1].detail})")
            self._request(_Pending("workload shift", event_s, now, workload=observed, rate_rps=seen.rate_rps))
        if self._keep_ticking(now):
            self.loop.schedule(now + self.config.tick_s, PRIORITY_DECIDE, self._tick, None)

    def _keep_ticking(self, now: float) -> bool:
        if now < self.last_arrival_s or self.deciding or self.queue:
            return True
        return bool(self.replay.active) and now < self.last_arrival_s + self.config.drain_limit_s

    def _failure_detected(self, gpus: list[str]) -> None:
        now = self.loop.now_s
        self.known_failed |= set(gpus)
        for g in gpus:
            self.tracker.forget(g)
        self.known = cluster_without(self.known, set(gpus))
        first = min(self.fail_time.get(g, now) for g in gpus)
        lost, moved = self.replay.sweep(set(gpus))
        nodes = sorted({g.split(":")[0] for g in gpus})
        self.detections.append(Detection("fail", first, now, f"{len(gpus)} GPU(s) of {', '.join(nodes)}"))
        self.note("detect", f"heartbeat timeout: {', '.join(gpus)}; router excludes their groups, "
                  f"{lost} request(s) start over, {moved} re-routed")
        self._settle()
        if self.policy is not ReschedPolicy.NONE and set(gpus) & set(self.plan.gpus):
            seen = self.monitor.estimate(now, self.replay.progress())
            self._request(_Pending("fail:" + ",".join(nodes), first, now,
                                   rate_rps=seen.rate_rps if seen is not None else None))

    # -- decide -----------------------------------------------------------------------------------------
    def _request(self, pending: _Pending) -> None:
        self.queue.append(pending)
        if not self.deciding:
            self._decide()

    def _decide(self) -> None:
        pending = self.queue.popleft()
        while self.queue:  # later requests are answered by the same decision (it sees the latest state)
            nxt = self.queue.popleft()
            pending = _Pending(f"{pending.cause}+{nxt.cause}", pending.event_s, pending.detected_s,
                               nxt.workload or pending.workload, pending.added | nxt.added,
                               nxt.rate_rps if nxt.rate_rps is not None else pending.rate_rps)
        workload = pending.workload or self.workload
        cfg = self.config
        start = time.perf_counter()
        if self.policy is ReschedPolicy.LIGHTWEIGHT:
            added = frozenset(g for g in pending.added if g in self.known.by_id)
            result = lightweight_replan(self.plan, self.known, self.model, workload, self.slo, added_gpus=added,
                                        rate_rps=pending.rate_rps)
            fixed = cfg.light_decision_s
        else:
            sched = dataclasses.replace(cfg.scheduler, kv_compression=self.plan.kv_transfer.compression)
            result = full_replan(self.plan, self.known, self.model, workload, self.slo, sched)
            fixed = cfg.full_decision_s
        wall = time.perf_counter() - start
        decision_s = wall if fixed is None else fixed
        self.workload = workload
        now = self.loop.now_s
        rec = _Record(pending, str(self.policy), now, decision_s, result, decision_wall_s=wall)
        self.records.append(rec)
        self.deciding = True
        self.note("decide", f"{self.policy} re-plan for {pending.cause}: {decision_s:.2f} s "
                  f"({'measured' if fixed is None else 'fixed'}; est. max rate {result.max_rate_at_slo:.2f} req/s)")
        self.loop.schedule(now + decision_s, PRIORITY_DECIDE, self._apply, rec)

    # -- apply ------------------------------------------------------------------------------------------
    def _apply(self, rec: _Record) -> None:
        now = self.loop.now_s
        rec.applied_s = now
        new = rec.result.plan
        replay = self.replay
        if self.policy is ReschedPolicy.FULL:
            lost = replay.stop_all()
            rec.lost = lost
            apply_s = rec.result.apply_time_s
            replay.install(new, ready_at_s=now + apply_s)
            self._settle()
            rec.waiting_for = {g.id for g in new.groups}
            self.note("apply", f"restart: every group stops for {apply_s:.1f} s (reload + start); "
                      f"{lost} in-flight request(s) start over")
        else:
            for earlier in self.records:
                if earlier is not rec and earlier.stage2 is not None:  # a staged rollout waits: finish it first
                    earlier.stage1.clear()
                    self._stage2(earlier)
            self._apply_light(rec, self.plan)
        if not rec.waiting_for:
            rec.ready_s = now
        self.plan = new
        self.deciding = False
        if self.queue:
            self._decide()

    def _apply_light(self, rec: _Record, old: Plan) -> None:
        """Drops at once; loads and flips toward an entry role (prefill, colocated) or out of decode at once;
        flips into the decode role of groups that take requests now only once those serve (make before
        break: a colocated group turned decode stops taking requests in seconds, a group turned prefill
        serves only after a full drain, so flipping both at once would leave no group taking requests).
        Meanwhile new requests go to the groups keeping their role (`_interim_routing`)."""
        new = rec.result.plan
        replay = self.replay
        changes = rec.result.changes
        for ch in changes:
            if ch.kind == "drop" and ch.group is not None:
                replay.drop(ch.group)
        old_phase = {g.id: g.phase for g in old.groups}
        late = [ch for ch in changes if ch.kind == "flip" and ch.group is not None
                and new.group(ch.group).phase is Phase.DECODE and old_phase.get(ch.group) is not Phase.DECODE]
        early = [ch for ch in changes if ch.group is not None and ch.kind != "drop" and ch not in late]
        for ch in early:
            assert ch.group is not None
            group = new.group(ch.group)
            if ch.kind == "flip":
                replay.flip(group, self.config.flip_drain_s)
            elif ch.kind in ("relayout", "add"):
                replay.load(group, ch.apply_time_s)
            rec.waiting_for.add(group.id)
            self.note("apply", f"{ch.kind} {ch.group}: {ch.detail} (>= {ch.apply_time_s:.1f} s)")
        busy = {ch.group for ch in changes if ch.group is not None and ch not in late}  # incl. drops
        interim = self._interim_routing(old, busy) if late and busy else None
        if late and busy and interim is not None and interim.entry:
            rec.stage1 = {ch.group for ch in early if ch.group is not None}
            rec.stage2 = late
            rec.waiting_for |= {ch.group for ch in late if ch.group is not None}
            replay.set_routing(old.model_copy(update={"routing": interim}))
            moved = replay.rebalance() if self.config.rebalance else 0
            self.note("apply", f"routing over the groups keeping their role until {', '.join(sorted(busy))} "
                      f"serve ({moved} queued request(s) re-dispatched); then "
                      f"{', '.join(ch.group or '-' for ch in late)} turn decode")
            return
        rec.stage2 = late
        self._stage2(rec)

    def _interim_routing(self, old: Plan, busy: set[str]) -> Routing:
        """Routing for the groups keeping their old role while `busy` ones drain or load: the routing LP for
        those groups and the workload just decided for (the old shares may suit the old workload only);
        the old shares restricted to them if that LP has no solution."""
        keep = [g for g in old.groups if g.id not in busy]
        try:
            routing = orchestrate(keep, self.known, self.model, self.workload, self.slo,
                                  old.kv_transfer.compression, fix_phases=True).routing
        except (PlanError, SpecError):
            routing = None
        return routing if routing is not None else effective_routing(old, {g.id for g in keep})

    def _stage2(self, rec: _Record) -> None:  # also a loop event (its argument is the record)
        """Flips into the decode role and the new plan's routing (once; a later decision may come first)."""
        if rec.stage2 is None:
            return
        new = rec.result.plan
        for ch in rec.stage2:
            assert ch.group is not None
            self.replay.flip(new.group(ch.group), self.config.flip_drain_s)
            rec.waiting_for.add(ch.group)
            self.note("apply", f"{ch.kind} {ch.group}: {ch.detail} (>= {ch.apply_time_s:.1f} s)")
        rec.stage2 = None
        self.replay.set_routing(new)
        moved = self.replay.rebalance() if self.config.rebalance else 0
        self.note("apply", "new routing shares for new requests (a loading or flipping group's share "
                  f"queues there until it serves); {moved} queued request(s) re-dispatched by them")

    # -- result -----------------------------------------------------------------------------------------
    def records_out(self) -> tuple[ReplanRecord, ...]:
        out = []
        for rec in self.records:
            p = rec.pending
            out.append(ReplanRecord(
                cause=p.cause, path=rec.path, event_s=p.event_s, detected_s=p.detected_s,
                decision_time_s=rec.decision_time_s, decision_wall_s=rec.decision_wall_s,
                applied_s=rec.applied_s, ready_s=rec.ready_s,
                changes=tuple(f"{c.kind} {c.group or '-'}: {c.detail}" for c in rec.result.changes),
                requests_restarted=rec.lost, estimated_max_rate_rps=rec.result.max_rate_at_slo,
                plan=rec.result.plan.to_dict()))
        return tuple(out)


def run_policy(plan: Plan, cluster: Cluster, model: ModelSpec, slo: SloSpec, workload: WorkloadSpec,
               stream: RequestStream, events: list[ReschedEvent], resolved: dict[str, WorkloadSpec],
               policy: ReschedPolicy, config: TimelineConfig = TimelineConfig(),
               sim_config: SimConfig = SimConfig()) -> PolicyRun:
    """Simulate the stream against `plan` with the timed `events`, rescheduling by `policy`."""
    req = _Requests(stream.arrival_s, stream.prompt_tokens, stream.output_tokens)
    replay = DynamicReplay(cluster, model, req, sim_config)
    replay.route_to_loading = config.route_to_loading
    last = float(stream.arrival_s[-1]) if stream.arrival_s.size else 0.0
    ctl = _Controller(replay, policy, plan, cluster, model, slo, workload, stream.rate_rps, events, resolved,
                      config, last)
    replay.install(plan)
    ctl.start()
    replay.start()
    t0 = time.perf_counter()
    replay.loop.run()
    wall = time.perf_counter() - t0
    first = np.asarray(req.first, dtype=float)
    finish = np.asarray(req.finish, dtype=float)
    extra: dict[str, Any] = {"held_at_end": len(replay.held)}
    return PolicyRun(
        policy=str(policy), arrival_s=stream.arrival_s, first_token_s=first, finish_s=finish,
        prompt_tokens=np.asarray(req.prompt, dtype=np.int64), output_tokens=np.asarray(req.output, dtype=np.int64),
        retries=np.asarray(replay.retries, dtype=np.int64), entry_group=np.asarray(req.entry, dtype=np.int64),
        group_ids=tuple(replay.incarnations), detections=tuple(ctl.detections),
        replans=ctl.records_out(), log=tuple(ctl.log), end_s=replay.loop.now_s,
        events=replay.loop.events_processed, wall_s=wall, extra=extra)
