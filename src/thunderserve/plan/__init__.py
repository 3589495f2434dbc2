"""The Plan contract, its JSON serde and validation.

Names are loaded on first use (PEP 562): `plan.model` alone does not pull in the cost model.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_WHERE = {
    "PLAN_FORMAT": "model", "READABLE_FORMATS": "model", "Group": "model", "KvGate": "model", "KvTransfer":
    "model", "Phase": "model", "Plan": "model", "Routing": "model", "Stage": "model", "load_plan": "model",
    "plan_from_dict": "model", "group_perf_of": "validate", "validate_plan": "validate",
}
__all__ = [
    "Group", "KvGate", "KvTransfer", "PLAN_FORMAT", "Phase", "Plan", "READABLE_FORMATS", "Routing", "Stage",
    "group_perf_of", "load_plan", "plan_from_dict", "validate_plan",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"thunderserve.plan.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'thunderserve.plan' has no attribute {name!r}")
