"""The two-level deployment planner.

Upper level: tabu search over GPU grouping and phase designation (`tabu`, started from a bandwidth-aware
grouping, `initial`). Lower level per candidate: each group's parallel layout by DP (`layout`) and the
routing transportation LP (`routing_lp`), scored by an analytic queueing-aware SLO estimate (`estimate`).

The names below are loaded on first use (PEP 562): importing a light submodule such as `scheduler.config`
(the CLI's option defaults) does not pull in scipy, HiGHS and networkx. `orchestrate` (the lower level alone)
is imported from `scheduler.api`: a lazily exported name cannot share its name with a submodule
(`scheduler.orchestrate`), which replaces it on the package when it is first imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thunderserve.scheduler.api import (
        estimate_attainment,
        estimate_max_rate,
        evaluate_plan,
        solve_routing,
    )
    from thunderserve.scheduler.config import PlanResult, SchedulerConfig
    from thunderserve.scheduler.layout import best_group_layout
    from thunderserve.scheduler.planner import plan_deployment

_WHERE = {
    "estimate_attainment": "api", "estimate_max_rate": "api", "evaluate_plan": "api",
    "solve_routing": "api", "PlanResult": "config", "SchedulerConfig": "config", "best_group_layout": "layout",
    "plan_deployment": "planner",
}
__all__ = [
    "PlanResult", "SchedulerConfig", "best_group_layout", "estimate_attainment", "estimate_max_rate",
    "evaluate_plan", "plan_deployment", "solve_routing",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"thunderserve.scheduler.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'thunderserve.scheduler' has no attribute {name!r}")
