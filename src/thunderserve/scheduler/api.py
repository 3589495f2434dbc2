"""Public lower-level entry points: routing, phase orchestration, estimates and plan evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thunderserve.costmodel.comm import Compression
from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, KvTransfer, Phase, Plan, Routing
from thunderserve.plan.validate import validate_plan, validate_routing, validate_structure
from thunderserve.scheduler.config import ALL_PHASES
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.estimate import attainment, max_rate_at_slo, plan_estimate
from thunderserve.scheduler.orchestrate import orchestrate_groups
from thunderserve.scheduler.routing_lp import route
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec


def _ctx(plan_or_compression: Plan | Compression | str, cluster: Cluster, model: ModelSpec,
         workload: WorkloadSpec, slo: SloSpec) -> PlanningContext:
    comp = (plan_or_compression.kv_transfer.compression if isinstance(plan_or_compression, Plan)
            else Compression(plan_or_compression))
    return PlanningContext(cluster, model, workload, slo, comp)


def _with_routing(ctx: PlanningContext, plan: Plan) -> tuple[Plan, float | None]:
    if plan.routing is not None:
        return plan, None
    lp = route(ctx, plan.groups)
    return plan.model_copy(update={"routing": lp.routing()}), lp.value_rps


def solve_routing(plan_without_routing: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec,
                  slo: SloSpec) -> Routing:
    """Routing shares from the two-stage transportation LP (see `routing_lp`); groups and phases as given."""
    validate_structure(plan_without_routing, cluster, model)
    ctx = _ctx(plan_without_routing, cluster, model, workload, slo)
    return route(ctx, plan_without_routing.groups).routing()


def orchestrate(groups: Sequence[Group], cluster: Cluster, model: ModelSpec, workload: WorkloadSpec,
                slo: SloSpec, compression: Compression | str = Compression.INT4, *, fix_phases: bool = False,
                rate_rps: float | None = None, phases: tuple[Phase, ...] = ALL_PHASES) -> Plan:
    """Phases (unless `fix_phases`) and routing for fixed groups and layouts; the plan's estimate filled."""
    if not groups:
        raise PlanError("groups: no groups to orchestrate")
    ctx = _ctx(compression, cluster, model, workload, slo)
    chosen, lp = orchestrate_groups(ctx, groups, fix_phases=fix_phases, phases=phases)
    plan = Plan(model=model.name, cluster=cluster.name, kv_transfer=KvTransfer(compression=ctx.compression),
                groups=tuple(chosen), routing=lp.routing())
    validate_plan(plan, cluster, model)
    est = plan_estimate(ctx, plan, rate_rps, extra={"lp_rate_rps": lp.value_rps})
    return plan.model_copy(update={"estimate": est})


def estimate_attainment(plan: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                        rate_rps: float) -> float:
    """Estimated fraction of requests meeting the SLO at `rate_rps` (routing solved first if missing)."""
    ctx = _ctx(plan, cluster, model, workload, slo)
    routed, _ = _with_routing(ctx, plan)
    return attainment(ctx, routed, rate_rps)


def estimate_max_rate(plan: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec,
                      slo: SloSpec) -> float:
    """Largest rate (req/s) whose estimated attainment meets `slo.attainment_target`."""
    ctx = _ctx(plan, cluster, model, workload, slo)
    routed, _ = _with_routing(ctx, plan)
    return max_rate_at_slo(ctx, routed)


def evaluate_plan(plan: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                  rate_rps: float | None = None) -> dict[str, Any]:
    """Score a plan: {"feasible": True, "max_rate_at_slo", "slo_attainment", "cost_per_hour", ...}.

    Routing is solved when the plan has none; raises PlanError for plans that do not validate.
    """
    if rate_rps is not None and rate_rps <= 0:
        raise PlanError(f"rate: must be positive, got {rate_rps}")
    validate_plan(plan, cluster, model, require_routing=False)
    ctx = _ctx(plan, cluster, model, workload, slo)
    routed, _ = _with_routing(ctx, plan)
    validate_routing(routed, cluster, model)
    est = plan_estimate(ctx, routed, rate_rps)
    phases = {ph.value: len(routed.groups_in(ph)) for ph in Phase}
    return {"feasible": True, **est, "num_groups": len(routed.groups), "num_gpus": len(routed.gpus),
            "phases": phases, "routing_solved": plan.routing is None}
