"""Lightweight re-scheduling: detect failures and workload shifts, re-plan, reconcile toward the new plan."""

from thunderserve.resched.events import EventKind, ReschedEvent, cluster_without, failed_gpus, parse_event
from thunderserve.resched.monitor import HeartbeatTracker, WorkloadEstimate, WorkloadMonitor
from thunderserve.resched.replan import Change, ReplanResult, diff_plans, full_replan, lightweight_replan
from thunderserve.resched.trigger import ShiftTrigger

__all__ = [
    "Change", "EventKind", "HeartbeatTracker", "ReplanResult", "ReschedEvent", "ShiftTrigger",
    "WorkloadEstimate", "WorkloadMonitor", "cluster_without", "diff_plans", "failed_gpus", "full_replan",
    "lightweight_replan", "parse_event",
]
