"""Data of a rescheduling timeline: knobs, the request stream, per-policy records and their metrics.

Metrics (a request meets the SLO when it finished with TTFT <= slo.ttft and mean TPOT <= slo.tpot; an
unfinished request is a miss; TTFT counts from the first arrival to the first token the client saw, retries
included):
  * bucket attainment: requests grouped by arrival time in `bucket_s` windows;
  * restored_at_s: start of the earliest bucket (from the one holding `from_s`) from which every later bucket
    up to `until_s` meets the attainment target;
  * window attainment: over the arrivals in [start_s, end_s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from thunderserve.resched.replan import FLIP_DRAIN_S
from thunderserve.resched.trigger import COOLDOWN_S, ENTER_DRIFT, EXIT_DRIFT, HOLD_S
from thunderserve.scheduler.config import SchedulerConfig
from thunderserve.spec.slo import SloSpec


class ReschedPolicy(StrEnum):
    NONE = "none"  # the router only stops using groups it detected dead
    LIGHTWEIGHT = "lightweight"  # keep groups and layouts; flip phases, re-route (resched.lightweight_replan)
    FULL = "full"  # the two-level search from scratch, applied by restarting every group


ALL_POLICIES = (ReschedPolicy.NONE, ReschedPolicy.LIGHTWEIGHT, ReschedPolicy.FULL)


@dataclass(frozen=True)
class TimelineConfig:
    """Knobs of detection, decision and apply (seconds of virtual time unless said otherwise)."""

    tick_s: float = 1.0  # controller period: heartbeats, monitor estimate, trigger update
    heartbeat_timeout_s: float = 3.0  # a GPU silent this long is declared dead
    # Two WorkloadMonitors see every arrival, completion and the tokens so far of unfinished requests: the
    # trigger's (a longer window, so that a few very long outputs do not look like a shift) and the re-plan's
    # (a shorter one: after a shift it holds mostly the new mix when the trigger fires).
    monitor_window_s: float = 60.0
    plan_window_s: float = 30.0
    enter_drift: float = ENTER_DRIFT  # ShiftTrigger thresholds (see resched.trigger)
    exit_drift: float = EXIT_DRIFT
    hold_s: float = HOLD_S
    # The trigger starts watching after this long: a simulation starts empty and cold (the first window is
    # short, and its output lengths rest on few finished requests); a running service is past that.
    watch_after_s: float = 120.0
    # Quiet time after a shift re-plan. A lightweight re-plan costs seconds and no reload, so it may refine
    # its decision as the window fills with the new mix; a full one restarts everything, so it waits longer.
    light_cooldown_s: float = 60.0
    full_cooldown_s: float = COOLDOWN_S
    light_decision_s: float | None = None  # lightweight decision time; None = measured wall-clock seconds
    full_decision_s: float | None = None  # full search decision time; None = measured wall-clock seconds
    flip_drain_s: float = FLIP_DRAIN_S  # least time a flipped group drains before its new role starts
    # A group loading weights or waiting out a flip keeps its share of new requests, which queue there
    # until it serves (True); False: the router spreads them over the serving groups (which, with share
    # routing, can leave a small group a backlog it never drains).
    route_to_loading: bool = True
    # On a lightweight re-route, requests queued at serving entry groups but not started go back to the
    # router and are handed out again by the new shares (the router can take back what no worker started).
    rebalance: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # the full re-plan's search
    drain_limit_s: float = 3600.0  # after the last arrival, stop waiting for requests nobody can serve


@dataclass(frozen=True)
class RequestStream:
    """Poisson arrivals at one rate; lengths drawn per segment from that segment's workload."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    segment: np.ndarray  # index into `workloads` per request
    workloads: tuple[str, ...]  # workload name per segment
    segment_start_s: tuple[float, ...]  # start of each segment (the first is 0)
    rate_rps: float
    duration_s: float
    seed: int

    @property
    def num_requests(self) -> int:
        return int(self.arrival_s.size)


@dataclass(frozen=True)
class LogEntry:
    time_s: float
    kind: str  # event | fail | detect | decide | apply | ready
    detail: str


@dataclass(frozen=True)
class Detection:
    kind: str  # fail | shift | add
    event_s: float  # when it happened (for a shift: the workload event before it, if any)
    detected_s: float
    detail: str

    @property
    def delay_s(self) -> float:
        return self.detected_s - self.event_s


@dataclass(frozen=True)
class ReplanRecord:
    cause: str
    path: str  # lightweight | full
    event_s: float
    detected_s: float
    decision_time_s: float  # measured or fixed, see TimelineConfig
    decision_wall_s: float  # what the re-plan call took on this machine (= decision_time_s when measured)
    applied_s: float  # decision done: new routing (lightweight) or restart begins (full)
    ready_s: float  # every flipped / loaded / restarted group serves (NaN: never)
    changes: tuple[str, ...]
    requests_restarted: int  # in-flight requests a restart sent back to the router
    estimated_max_rate_rps: float
    plan: dict[str, Any]

    @property
    def detection_delay_s(self) -> float:
        return self.detected_s - self.event_s

    @property
    def apply_time_s(self) -> float:
        return self.ready_s - self.applied_s

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.cause, "path": self.path, "event_s": self.event_s, "detected_s": self.detected_s,
                "detection_delay_s": self.detection_delay_s, "decision_time_s": self.decision_time_s,
                "decision_wall_s": self.decision_wall_s,
                "applied_s": self.applied_s, "ready_s": self.ready_s, "apply_time_s": self.apply_time_s,
                "changes": list(self.changes), "requests_restarted": self.requests_restarted,
                "estimated_max_rate_rps": self.estimated_max_rate_rps}


@dataclass(frozen=True)
class PolicyRun:
    """Per-request records of one policy over the whole stream, and what the controller did."""

    policy: str
    arrival_s: np.ndarray
    first_token_s: np.ndarray  # NaN: never
    finish_s: np.ndarray  # NaN: never finished
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    retries: np.ndarray  # times each request started over after losing its KV
    entry_group: np.ndarray | None = None  # last entry group object per request (index into group_ids)
    group_ids: tuple[str, ...] = ()  # plan group id of each group object (one per incarnation)
    detections: tuple[Detection, ...] = ()
    replans: tuple[ReplanRecord, ...] = ()
    log: tuple[LogEntry, ...] = ()
    end_s: float = 0.0
    events: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unfinished(self) -> int:
        return int(np.isnan(self.finish_s).sum())

    def meets(self, slo: SloSpec) -> np.ndarray:
        """Per request: finished within both SLO targets."""
        ttft = self.first_token_s - self.arrival_s
        steps = np.maximum(self.output_tokens - 1, 1)
        tpot = np.where(self.output_tokens > 1, (self.finish_s - self.first_token_s) / steps, 0.0)
        with np.errstate(invalid="ignore"):
            return np.isfinite(self.finish_s) & (ttft <= slo.ttft_s) & (tpot <= slo.tpot_s)

    def attainment(self, slo: SloSpec, start_s: float = 0.0, end_s: float = math.inf) -> float:
        sel = (self.arrival_s >= start_s) & (self.arrival_s < end_s)
        return float(self.meets(slo)[sel].mean()) if sel.any() else math.nan

    def buckets(self, slo: SloSpec, bucket_s: float, end_s: float) -> list[tuple[float, float, int]]:
        """(bucket start, attainment, requests) for arrival buckets [k*bucket_s, (k+1)*bucket_s) up to end_s."""
        ok = self.meets(slo)
        idx = np.floor(self.arrival_s / bucket_s).astype(np.int64)
        count = max(int(math.ceil(end_s / bucket_s - 1e-9)), 0)
        n = np.bincount(idx, minlength=count)[:count]
        good = np.bincount(idx, weights=ok.astype(float), minlength=count)[:count]
        return [(k * bucket_s, float(good[k] / n[k]) if n[k] else math.nan, int(n[k])) for k in range(count)]

    def restored_at_s(self, slo: SloSpec, bucket_s: float, from_s: float, until_s: float) -> float | None:
        """Start of the earliest bucket (from the one holding `from_s`) after which every bucket up to
        `until_s` meets the attainment target; None when even the last one misses."""
        rows = [b for b in self.buckets(slo, bucket_s, until_s) if b[0] + bucket_s > from_s and b[2] > 0]
        restored = None
        for start, att, _ in reversed(rows):
            if att >= slo.attainment_target:
                restored = start
            else:
                break
        return restored
