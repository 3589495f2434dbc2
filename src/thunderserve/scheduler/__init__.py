"""The two-level deployment planner.

Upper level: tabu search over GPU grouping and phase designation (`tabu`, started from a bandwidth-aware
grouping, `initial`). Lower level per candidate: each group's parallel layout by DP (`layout`) and the
routing transportation LP (`routing_lp`), scored by an analytic queueing-aware SLO estimate (`estimate`).
"""

from thunderserve.scheduler.api import (
    estimate_attainment,
    estimate_max_rate,
    evaluate_plan,
    orchestrate,
    solve_routing,
)
from thunderserve.scheduler.config import PlanResult, SchedulerConfig
from thunderserve.scheduler.layout import best_group_layout
from thunderserve.scheduler.planner import plan_deployment

__all__ = [
    "PlanResult", "SchedulerConfig", "best_group_layout", "estimate_attainment", "estimate_max_rate",
    "evaluate_plan", "orchestrate", "plan_deployment", "solve_routing",
]
