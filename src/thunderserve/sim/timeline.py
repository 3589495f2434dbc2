"""Rescheduling in the simulator: timed events hit a running deployment and a policy reacts in virtual time.

Events (text form `T:fail:NODE[:I]`, `T:workload:NAME|CSV`, `T:add:NODE.yaml`, see `resched.events`):
  * fail: the GPUs stop at T. Their groups stop silently; requests on them are lost from that group and,
    once the router detects the failure, start over at the entry router (prefill re-run: the KV is gone).
  * workload: from T on, prompt/output lengths are drawn from the new workload's trace. The arrival rate is
    kept (a shift changes the mix, not the requests per second).
  * add: the node's GPUs exist from T on (idle until a policy uses them).

Policies, compared on the same request stream (`ReschedPolicy`):
  none         no rescheduling: the router excludes groups it detected dead (and prefill groups left with
               no decode group); nothing else changes.
  lightweight  detect -> decide with `resched.lightweight_replan` (keep groups and layouts, re-decide phases
               and routing) -> apply: routing changes at once for new requests; a flipped group takes no new
               work of its old role, hands its queued-but-unstarted requests back to the router, finishes
               its in-flight work and serves its new role after max(FLIP_DRAIN_S, drain); re-laid or added
               groups serve after `load_time_s` (weight reload + start). Make before break: when groups
               also turn prefill (a full drain) or load, the groups turning decode keep their old role under
               a routing for the groups keeping theirs until those serve, then flip. On each re-route,
               requests queued at serving entry groups but not started are handed out again by the new
               shares (`TimelineConfig.rebalance`).
  full         detect -> decide with `resched.full_replan` (the two-level search on the known cluster) ->
               restart: every group stops for the new plan's apply time (weight reload + start), in-flight
               requests start over, then the new plan serves.
Detection (all modelled in virtual time, see `sim.resched_loop`): failures by heartbeat timeout (GPUs beat
every tick; silent for `heartbeat_timeout_s` = dead); workload shifts by a `WorkloadMonitor` (the requests
that arrived in a sliding window, output lengths by Kaplan-Meier over the finished ones and the tokens so far of
the unfinished ones, `DynamicReplay.progress`) feeding a `ShiftTrigger` (drift held for `hold_s`, hysteresis, cooldown), the
re-plan targeting the monitor's window as a workload; additions at once (the node registers). Decision time
is the measured wall-clock time of the re-plan call, or a fixed value (`TimelineConfig`), for determinism.
The old plan serves during the decision.

The SLO is fixed for the run (a service's latency targets do not change with its traffic mix). A fresh full
plan for the final state (`fresh_reference`) is the yardstick for how much of the attainable attainment a
policy recovers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from thunderserve.errors import SpecError
from thunderserve.plan import Plan, validate_plan
from thunderserve.resched.events import (
    EventKind,
    ReschedEvent,
    cluster_with_added,
    cluster_without,
    failed_gpus,
)
from thunderserve.scheduler.config import SchedulerConfig
from thunderserve.sim.config import SimConfig
from thunderserve.sim.replay import simulate
from thunderserve.sim.resched_loop import run_policy
from thunderserve.sim.timeline_types import (
    ALL_POLICIES,
    PolicyRun,
    RequestStream,
    ReschedPolicy,
    TimelineConfig,
)
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec, load_workload

DEFAULT_BUCKET_S = 30.0
DEFAULT_FINAL_WINDOW_S = 300.0

__all__ = ["ALL_POLICIES", "DEFAULT_BUCKET_S", "PolicyRun", "ReschedPolicy", "RequestStream", "TimelineConfig",
           "TimelineResult", "final_state", "fresh_reference", "run_timeline", "shifting_stream"]


def shifting_stream(segments: Sequence[tuple[float, WorkloadSpec]], rate_rps: float, duration_s: float,
                    seed: int = 0) -> RequestStream:
    """Poisson arrivals at `rate_rps` for `duration_s`; segment k (from its start time on) draws its (prompt,
    output) pairs from its own workload. With one segment this is `WorkloadSpec.poisson_requests`."""
    if rate_rps <= 0:
        raise SpecError("must be positive", field="--rate")
    first = segments[0][1]
    times, prompt, output = first.poisson_requests(rate_rps, duration_s, seed=seed)
    prompt, output = prompt.copy(), output.copy()
    starts = [s for s, _ in segments]
    seg = np.searchsorted(np.asarray(starts, dtype=float), times, side="right") - 1
    seg = np.maximum(seg, 0)
    for k, (_, wl) in enumerate(segments[1:], start=1):
        sel = np.flatnonzero(seg == k)
        if sel.size:
            rng = np.random.default_rng([seed, k])
            idx = rng.integers(0, wl.num_requests, size=sel.size)
            prompt[sel] = wl.prompt_tokens[idx]
            output[sel] = wl.output_tokens[idx]
    return RequestStream(times, prompt, output, seg.astype(np.int64), tuple(wl.name for _, wl in segments),
                         tuple(float(s) for s in starts), rate_rps, duration_s, seed)


@dataclass(frozen=True)
class TimelineResult:
    stream: RequestStream
    slo: SloSpec
    events: tuple[ReschedEvent, ...]
    runs: dict[str, PolicyRun]
    bucket_s: float = DEFAULT_BUCKET_S
    warmup_s: float = 0.0
    final_window_s: float = DEFAULT_FINAL_WINDOW_S
    reference: PolicyRun | None = None  # a fresh full plan for the final state, from the last event on
    reference_max_rate_rps: float | None = None  # the planner's estimate for that plan

    @property
    def last_event_s(self) -> float:
        return max((e.at_s or 0.0 for e in self.events), default=0.0)

    @property
    def final_window(self) -> tuple[float, float]:
        end = self.stream.duration_s
        return max(end - self.final_window_s, self.last_event_s), end

    def event_windows(self) -> list[tuple[ReschedEvent, float, float]]:
        """(event, start, end of the stretch it governs: until the next event or the end of arrivals)."""
        times = sorted({e.at_s or 0.0 for e in self.events})
        out = []
        for e in self.events:
            t = e.at_s or 0.0
            later = [x for x in times if x > t]
            out.append((e, t, later[0] if later else self.stream.duration_s))
        return out

    def policy_summary(self, run: PolicyRun) -> dict[str, Any]:
        slo = self.slo
        lo, hi = self.final_window
        recovery = []
        for ev, start, end in self.event_windows():
            det = [d for d in run.detections if abs(d.event_s - start) < 1e-9 or
                   (d.kind == "shift" and start <= d.detected_s < end)]
            detected = det[0].detected_s if det else None
            restored = run.restored_at_s(slo, self.bucket_s, start, end)
            ref = detected if detected is not None else start
            recovery.append({
                "event": ev.describe(), "event_s": start, "detected_s": detected,
                "detection_delay_s": None if detected is None else detected - start,
                "restored_at_s": restored,
                "restore_delay_s": None if restored is None else max(restored - ref, 0.0),
                "min_bucket_attainment": _min_bucket(run, slo, self.bucket_s, start, end)})
        return {
            "overall_attainment": run.attainment(slo, self.warmup_s),
            "final_window_attainment": run.attainment(slo, lo, hi),
            "requests": int(run.arrival_s.size), "retried_requests": int((run.retries > 0).sum()),
            "unfinished": run.unfinished, "replans": [r.to_dict() for r in run.replans],
            "detections": [{"kind": d.kind, "event_s": d.event_s, "detected_s": d.detected_s,
                            "delay_s": d.delay_s, "detail": d.detail} for d in run.detections],
            "recovery": recovery,
            "buckets": [list(b) for b in run.buckets(slo, self.bucket_s, self.stream.duration_s)],
            "log": [[e.time_s, e.kind, e.detail] for e in run.log],
            "sim_wall_s": run.wall_s, "sim_events": run.events, "end_s": run.end_s, **run.extra,
        }

    def to_dict(self) -> dict[str, Any]:
        s = self.stream
        lo, hi = self.final_window
        doc: dict[str, Any] = {
            "rate_rps": s.rate_rps, "duration_s": s.duration_s, "seed": s.seed, "bucket_s": self.bucket_s,
            "warmup_s": self.warmup_s, "final_window_s": [lo, hi], "slo": self.slo.model_dump(),
            "workloads": [{"name": n, "start_s": t} for n, t in zip(s.workloads, s.segment_start_s, strict=True)],
            "events": [{"at_s": e.at_s, "event": e.describe()} for e in self.events],
            "policies": {name: self.policy_summary(run) for name, run in self.runs.items()},
        }
        if self.reference is not None:
            ref = self.reference
            ref_final = ref.attainment(self.slo, lo, hi)
            doc["reference"] = {
                "what": "fresh full plan for the final state, serving the same requests from the last event on",
                "from_s": self.last_event_s, "estimated_max_rate_rps": self.reference_max_rate_rps,
                "final_window_attainment": ref_final, "unfinished": ref.unfinished,
                "buckets": [list(b) for b in ref.buckets(self.slo, self.bucket_s, s.duration_s)
                            if b[0] + self.bucket_s > self.last_event_s]}
            for summary in doc["policies"].values():
                mine = summary["final_window_attainment"]
                summary["final_vs_fresh"] = mine / ref_final if ref_final and ref_final > 0 else None
        return doc


def _min_bucket(run: PolicyRun, slo: SloSpec, bucket_s: float, start: float, end: float) -> float | None:
    vals = [a for t, a, n in run.buckets(slo, bucket_s, end) if t + bucket_s > start and n > 0]
    return min(vals) if vals else None


def final_state(cluster: Cluster, workload: WorkloadSpec, events: Sequence[ReschedEvent],
                resolve: Callable[[str], WorkloadSpec] = load_workload) -> tuple[Cluster, WorkloadSpec]:
    """The live cluster and the workload after every event (validates nodes, files and workloads)."""
    live = cluster
    wl = workload
    for ev in sorted(events, key=lambda e: e.at_s or 0.0):
        if ev.kind is EventKind.FAIL:
            live = cluster_without(live, failed_gpus(cluster, ev) & set(live.by_id))
        elif ev.kind is EventKind.ADD:
            assert ev.add_path is not None
            live = cluster_with_added(live, ev.add_path)
            cluster = cluster_with_added(cluster, ev.add_path)
        else:
            assert ev.workload is not None
            wl = resolve(ev.workload)
    return live, wl


def fresh_reference(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                    stream: RequestStream, from_s: float, scheduler: SchedulerConfig = SchedulerConfig(),
                    sim_config: SimConfig = SimConfig(), plan: Plan | None = None) -> tuple[PolicyRun, float]:
    """Plan from scratch for (cluster, workload) (or take `plan`) and serve the stream's requests arriving
    from `from_s` on with it, starting empty at `from_s`. Returns the run (absolute times) and the plan's
    estimated max rate."""
    from thunderserve.scheduler import estimate_max_rate, plan_deployment

    if plan is None:
        result = plan_deployment(cluster, model, workload, slo, scheduler)
        plan, est = result.plan, result.max_rate_at_slo
    else:
        validate_plan(plan, cluster, model)
        est = estimate_max_rate(plan, cluster, model, workload, slo)
    sel = stream.arrival_s >= from_s
    arrival = stream.arrival_s[sel] - from_s
    sim = simulate(plan, cluster, model, arrival, stream.prompt_tokens[sel], stream.output_tokens[sel],
                   SimConfig(batching=sim_config.batching, colocated_policy=sim_config.colocated_policy,
                             warmup_s=0.0))
    run = PolicyRun(policy="fresh", arrival_s=arrival + from_s, first_token_s=sim.first_token_s + from_s,
                    finish_s=sim.finish_s + from_s, prompt_tokens=sim.prompt_tokens,
                    output_tokens=sim.output_tokens, retries=np.zeros(arrival.size, dtype=np.int64),
                    end_s=sim.end_s + from_s, events=sim.events, wall_s=sim.wall_s,
                    extra={"plan": plan.to_dict()})
    return run, est


def run_timeline(plan: Plan, cluster: Cluster, model: ModelSpec, slo: SloSpec, workload: WorkloadSpec,
                 events: Sequence[ReschedEvent], rate_rps: float, duration_s: float, *, seed: int = 0,
                 policies: Sequence[ReschedPolicy] = ALL_POLICIES, config: TimelineConfig = TimelineConfig(),
                 sim_config: SimConfig = SimConfig(), bucket_s: float = DEFAULT_BUCKET_S,
                 final_window_s: float = DEFAULT_FINAL_WINDOW_S, reference: bool | Plan = False,
                 resolve: Callable[[str], WorkloadSpec] = load_workload,
                 progress: Callable[[str], None] | None = None) -> TimelineResult:
    """Simulate `plan` under the timed `events` once per policy, on one request stream (see module doc).

    `reference`: True plans a fresh full plan for the final state (cluster and workload after every event)
    and serves the requests from the last event on with it; a Plan is used as that fresh plan as given.
    """
    validate_plan(plan, cluster, model)
    timed = sorted(events, key=lambda e: e.at_s if e.at_s is not None else -1.0)
    for ev in timed:
        if ev.at_s is None:
            raise SpecError(f"event '{ev.describe()}' needs a time (T:{ev.describe()})", field="--event")
        if ev.at_s > duration_s:
            raise SpecError(f"event '{ev.at_s:g}:{ev.describe()}' is after the end of arrivals ({duration_s:g} s)",
                            field="--event")
    resolved: dict[str, WorkloadSpec] = {}
    segments: list[tuple[float, WorkloadSpec]] = [(0.0, workload)]
    for ev in timed:
        if ev.kind is EventKind.WORKLOAD:
            assert ev.workload is not None and ev.at_s is not None
            if ev.workload not in resolved:
                resolved[ev.workload] = resolve(ev.workload)
            if ev.at_s <= 0.0:
                segments[0] = (0.0, resolved[ev.workload])
            else:
                segments.append((ev.at_s, resolved[ev.workload]))
    live, final_wl = final_state(cluster, workload, timed, lambda name: resolved[name])
    stream = shifting_stream(segments, rate_rps, duration_s, seed)
    runs: dict[str, PolicyRun] = {}
    for policy in policies:
        if progress is not None:
            progress(f"policy {policy}: simulating {stream.num_requests} requests")
        runs[str(policy)] = run_policy(plan, cluster, model, slo, workload, stream, timed, resolved,
                                       ReschedPolicy(policy), config, sim_config)
    ref_run = None
    ref_rate = None
    if reference and timed:
        if progress is not None:
            progress("fresh full plan for the final state")
        last = max(e.at_s or 0.0 for e in timed)
        ref_run, ref_rate = fresh_reference(live, model, final_wl, slo, stream, last, config.scheduler,
                                            sim_config, plan=reference if isinstance(reference, Plan) else None)
    return TimelineResult(stream=stream, slo=slo, events=tuple(timed), runs=runs, bucket_s=bucket_s,
                          warmup_s=sim_config.warmup_s, final_window_s=final_window_s, reference=ref_run,
                          reference_max_rate_rps=ref_rate)
