"""The rescheduling issue's done-when scenarios, built from the planner and the timeline simulator.

`benchmarks/bench_resched.py` prints them; slow tests assert their checks (`report.timeline.timeline_checks`).

  shift    plan for workload A; at half time the mix becomes workload B. Rate = `rate_fraction` x the simulated
           max rate at the SLO of a fresh plan for B (the coding plan must meet the SLO on A there too).
           Checks: lightweight restores the target within 60 s of detection; its final-window attainment is
           >= 90% of the fresh B plan's on the same requests.
  failure  plan for the workload on the whole cluster; at half time a node fails. Rate = `rate_fraction` x the
           simulated max rate of a fresh plan on the surviving GPUs. Check: lightweight's final-window
           attainment >= 90% of that fresh plan's.
  steady   the same plan, workload and rate for `steady_duration_s` with no event. Check: no re-plan.
Plans come from `plan_deployment` with an iteration budget instead of a time limit, so a run is
deterministic (same plans, same streams, fixed decision times).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from thunderserve.plan import Plan
from thunderserve.report.compare import finite_json
from thunderserve.report.timeline import timeline_checks
from thunderserve.resched.events import cluster_without, failed_gpus, parse_event
from thunderserve.scheduler import SchedulerConfig, plan_deployment
from thunderserve.sim.config import LoadConfig, SimConfig
from thunderserve.sim.metrics import max_rate_at_slo, simulate_at_rate, slo_attainment
from thunderserve.sim.timeline import run_timeline
from thunderserve.sim.timeline_types import ALL_POLICIES, ReschedPolicy, TimelineConfig
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

DETERMINISTIC_SEARCH = SchedulerConfig(max_evaluations=100_000, max_iterations=200, patience=200)


@dataclass(frozen=True)
class ScenarioConfig:
    rate_fraction: float = 0.7  # of the fresh plan's simulated max rate at the SLO (for the final state)
    duration_s: float = 1200.0  # seconds of arrivals; the event comes at half time
    steady_duration_s: float = 1800.0
    seed: int = 0
    scheduler: SchedulerConfig = DETERMINISTIC_SEARCH
    # fixed decision times (determinism), above what the calls measure on this 2-core machine under load
    # (lightweight 0.07-0.45 s with the multi-start phase search; the full search's is budgeted separately)
    timeline: TimelineConfig = field(default_factory=lambda: TimelineConfig(
        light_decision_s=0.5, full_decision_s=10.0, scheduler=DETERMINISTIC_SEARCH))
    load: LoadConfig = field(default_factory=lambda: LoadConfig(duration_s=300.0))  # max-rate bisection probes
    sim: SimConfig = field(default_factory=SimConfig)
    bucket_s: float = 30.0


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    rate_rps: float
    rate_basis: str
    doc: dict[str, Any]  # the timeline document (report.timeline renders it)
    checks: list[dict[str, Any]]
    facts: dict[str, Any]


class Planner:
    """plan_deployment, memoised per (GPU set, workload name) so scenarios share plans."""

    def __init__(self, model: ModelSpec, slo: SloSpec, config: SchedulerConfig = DETERMINISTIC_SEARCH) -> None:
        self.model, self.slo, self.config = model, slo, config
        self._plans: dict[tuple[tuple[str, ...], str], tuple[Plan, float]] = {}

    def plan(self, cluster: Cluster, workload: WorkloadSpec) -> tuple[Plan, float]:
        """(plan, estimated max rate at the SLO)."""
        key = (tuple(sorted(cluster.by_id)), workload.name)
        if key not in self._plans:
            r = plan_deployment(cluster, self.model, workload, self.slo, self.config)
            self._plans[key] = (r.plan, r.max_rate_at_slo)
        return self._plans[key]

    def sim_max_rate(self, plan: Plan, cluster: Cluster, workload: WorkloadSpec, hint: float,
                     cfg: ScenarioConfig) -> float:
        return max_rate_at_slo(plan, cluster, self.model, workload, self.slo, cfg.sim, cfg.load,
                               rate_hint_rps=hint).rate_rps


def _doc(result: Any, model: ModelSpec, cluster: Cluster) -> dict[str, Any]:
    doc = result.to_dict()
    doc.update({"model": model.name, "cluster": cluster.name})
    return dict(finite_json(doc))


def shift_scenario(cluster: Cluster, model: ModelSpec, slo: SloSpec, before: WorkloadSpec, after: WorkloadSpec,
                   cfg: ScenarioConfig = ScenarioConfig(), planner: Planner | None = None,
                   policies: tuple[ReschedPolicy, ...] = ALL_POLICIES) -> ScenarioResult:
    planner = planner or Planner(model, slo, cfg.scheduler)
    plan_a, _ = planner.plan(cluster, before)
    plan_b, est_b = planner.plan(cluster, after)
    max_b = planner.sim_max_rate(plan_b, cluster, after, est_b, cfg)
    rate = cfg.rate_fraction * max_b
    at = cfg.duration_s / 2
    before_att = slo_attainment(simulate_at_rate(plan_a, cluster, model, before, rate, cfg.sim,
                                                 LoadConfig(duration_s=cfg.duration_s, seed=cfg.seed)), slo)
    event = parse_event(f"{at:g}:workload:{after.name}", timed=True)
    result = run_timeline(plan_a, cluster, model, slo, before, [event], rate, cfg.duration_s, seed=cfg.seed,
                          policies=policies, config=cfg.timeline, sim_config=cfg.sim, bucket_s=cfg.bucket_s,
                          reference=plan_b, resolve=lambda name: after)
    doc = _doc(result, model, cluster)
    checks = timeline_checks(doc)
    facts = {"fresh_plan_sim_max_rate_rps": max_b, "fresh_plan_estimated_max_rate_rps": est_b,
             "initial_plan_attainment_on_initial_workload_at_rate": before_att,
             "initial_plan_meets_slo_at_rate": before_att >= slo.attainment_target}
    return ScenarioResult(f"shift {before.name}->{after.name}", rate,
                          f"{cfg.rate_fraction:.0%} of the fresh {after.name} plan's simulated max rate "
                          f"({max_b:.2f} req/s)", doc, checks, facts)


def failure_scenario(cluster: Cluster, model: ModelSpec, slo: SloSpec, workload: WorkloadSpec, node: str,
                     cfg: ScenarioConfig = ScenarioConfig(), planner: Planner | None = None,
                     policies: tuple[ReschedPolicy, ...] = ALL_POLICIES) -> ScenarioResult:
    planner = planner or Planner(model, slo, cfg.scheduler)
    at = cfg.duration_s / 2
    event = parse_event(f"{at:g}:fail:{node}", timed=True)
    survivors = cluster_without(cluster, failed_gpus(cluster, event))
    plan, _ = planner.plan(cluster, workload)
    fresh, est = planner.plan(survivors, workload)
    max_fresh = planner.sim_max_rate(fresh, survivors, workload, est, cfg)
    rate = cfg.rate_fraction * max_fresh
    result = run_timeline(plan, cluster, model, slo, workload, [event], rate, cfg.duration_s, seed=cfg.seed,
                          policies=policies, config=cfg.timeline, sim_config=cfg.sim, bucket_s=cfg.bucket_s,
                          reference=fresh)
    doc = _doc(result, model, cluster)
    checks = [c for c in timeline_checks(doc) if "restored" not in c["name"]]
    facts = {"fresh_plan_sim_max_rate_rps": max_fresh, "fresh_plan_estimated_max_rate_rps": est,
             "plan_gpus_on_failed_node": sorted(set(plan.gpus) & set(failed_gpus(cluster, event)))}
    return ScenarioResult(f"fail:{node} ({workload.name})", rate,
                          f"{cfg.rate_fraction:.0%} of the fresh plan's simulated max rate on the surviving GPUs "
                          f"({max_fresh:.2f} req/s)", doc, checks, facts)


def steady_scenario(cluster: Cluster, model: ModelSpec, slo: SloSpec, workload: WorkloadSpec, rate_rps: float,
                    cfg: ScenarioConfig = ScenarioConfig(), planner: Planner | None = None) -> ScenarioResult:
    planner = planner or Planner(model, slo, cfg.scheduler)
    plan, _ = planner.plan(cluster, workload)
    result = run_timeline(plan, cluster, model, slo, workload, [], rate_rps, cfg.steady_duration_s,
                          seed=cfg.seed, policies=(ReschedPolicy.LIGHTWEIGHT, ReschedPolicy.FULL),
                          config=cfg.timeline, sim_config=cfg.sim, bucket_s=cfg.bucket_s)
    doc = _doc(result, model, cluster)
    return ScenarioResult(f"steady {workload.name}", rate_rps, "the shift scenario's rate", doc,
                          timeline_checks(doc), {})
