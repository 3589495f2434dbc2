"""The Plan contract, its JSON serde and validation."""

from thunderserve.plan.model import (
    PLAN_FORMAT,
    READABLE_FORMATS,
    Group,
    KvGate,
    KvTransfer,
    Phase,
    Plan,
    Routing,
    Stage,
    load_plan,
    plan_from_dict,
)
from thunderserve.plan.validate import group_perf_of, validate_plan

__all__ = [
    "PLAN_FORMAT", "READABLE_FORMATS", "Group", "KvGate", "KvTransfer", "Phase", "Plan", "Routing", "Stage", "group_perf_of", "load_plan",
    "plan_from_dict", "validate_plan",
]
