"""Side-by-side comparison: ThunderServe and every baseline planned on the same GPUs and simulated alike.

Protocol:
  1. Plan each system: ThunderServe with `scheduler.plan_deployment`, baselines from `BASELINES`; with a
     baseline cluster, the baselines are planned there too (entries `<system>@<cluster>`).
  2. `max_rate_at_slo` of each plan by simulation (see `sim.metrics`: Poisson arrivals, warm-up, bisection).
  3. The comparison rate is the best baseline's max rate on the main cluster (ThunderServe's own when every
     baseline is at 0). At that common rate each system reports SLO attainment, p50/p90/p99 TTFT and TPOT
     and its latency deadline (smallest SLO scale meeting the attainment target).
  4. Throughput (requests/s and output tokens/s) is measured at each system's own max rate at the SLO: the
     goodput it sustains.
  5. Curves for the plot: attainment vs rate on a common grid, attainment vs SLO scale at the common rate.
Colocated-only systems (vLLM, HexGen) run the chunked-prefill scheduler; with `try_prefill_first` they are
also simulated with the older prefill-first policy and keep whichever sustains the higher rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from thunderserve.costmodel.comm import Compression
from thunderserve.plan import Phase, Plan
from thunderserve.policy.step import ColocatedPolicy
from thunderserve.sim.config import LoadConfig, SimConfig
from thunderserve.sim.metrics import (
    attainment_vs_factor,
    compute_metrics,
    latency_deadline_scale,
    max_rate_at_slo,
    simulate_at_rate,
)
from thunderserve.sim.replay import SimResult
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

PlannerFn = Callable[[Cluster, ModelSpec, WorkloadSpec, SloSpec], Plan]
ProgressFn = Callable[[int, int, str], None]  # (units done, units in all, what is running)
RATE_GRID = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.15, 1.3)  # x the fastest system's max rate
SCALE_GRID = tuple(float(x) for x in np.round(np.geomspace(0.1, 4.0, 24), 4))  # x the SLO's own targets
THUNDERSERVE = "thunderserve"


@dataclass(frozen=True)
class CompareConfig:
    load: LoadConfig = field(default_factory=LoadConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    planner_time_limit_s: float = 10.0
    baselines: tuple[str, ...] = ("vllm", "distserve", "hexgen")
    try_prefill_first: bool = True
    curves: bool = True
    seed: int = 0
    verify_top: int = 0  # ThunderServe's planner re-scores its K best candidates by simulation (0: off)
    kv_compression: Compression = Compression.INT4  # ThunderServe's KV compression (the CLI applies the KV gate)


def default_planners(config: CompareConfig) -> dict[str, PlannerFn]:
    """ThunderServe plus the requested baselines, in report order."""
    from thunderserve.scheduler.baselines import BASELINES

    def thunderserve(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec) -> Plan:
        from thunderserve.scheduler import SchedulerConfig, plan_deployment
        from thunderserve.sim import rescorer

        cfg = SchedulerConfig(time_limit_s=config.planner_time_limit_s, seed=config.seed,
                              verify_top=config.verify_top, kv_compression=config.kv_compression)
        result = plan_deployment(cluster, model, workload, slo, config=cfg,
                                 rescore=rescorer(cluster, model, workload, slo))
        est = dict(result.plan.estimate)
        est.setdefault("planner_max_rate_rps", result.max_rate_at_slo)
        return result.plan.model_copy(update={"estimate": est})

    out: dict[str, PlannerFn] = {THUNDERSERVE: thunderserve}
    for name in config.baselines:
        if name not in BASELINES:
            from thunderserve.errors import SpecError

            raise SpecError(f"unknown baseline '{name}' (known: {', '.join(BASELINES)})", field="baselines")
        out[name] = BASELINES[name]
    return out


@dataclass
class _Entry:
    name: str
    cluster: Cluster
    plan: Plan
    decision_time_s: float
    sim: SimConfig
    max_rate_rps: float = 0.0
    rate_by_policy: dict[str, float] = field(default_factory=dict)  # colocated-only systems: both policies
    data: dict[str, Any] = field(default_factory=dict)


def rate_hint(plan: Plan) -> float | None:
    """Where a plan's own estimate says its max rate is (planner or baseline search); starts the bisection."""
    for key in ("rate_hint_rps", "planner_max_rate_rps"):
        value = plan.estimate.get(key)
        if isinstance(value, int | float) and value > 0:
            return float(value)
    return None


def _colocated_only(plan: Plan) -> bool:
    return all(g.phase is Phase.COLOCATED for g in plan.groups)


def run_comparison(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec, *,
                   baseline_cluster: Cluster | None = None, config: CompareConfig = CompareConfig(),
                   planners: dict[str, PlannerFn] | None = None,
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """Plan, simulate and compare every system; returns the `compare --json` document."""
    planners = planners if planners is not None else default_planners(config)
    jobs: list[tuple[str, Cluster, PlannerFn]] = [(n, cluster, f) for n, f in planners.items()]
    if baseline_cluster is not None:
        jobs += [(f"{n}@{baseline_cluster.name}", baseline_cluster, f) for n, f in planners.items()
                 if n != THUNDERSERVE]
    per_entry = 3 + (1 if config.curves else 0)
    total = len(jobs) * per_entry
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        if progress is not None:
            progress(done, total, what)
        done += 1

    entries: list[_Entry] = []
    for name, cl, fn in jobs:
        tick(f"planning {name}")
        t0 = time.perf_counter()
        plan = fn(cl, model, workload, slo)
        entries.append(_Entry(name, cl, plan, time.perf_counter() - t0, config.sim))

    for e in entries:
        tick(f"max rate of {e.name}")
        best = max_rate_at_slo(e.plan, e.cluster, model, workload, slo, e.sim, config.load,
                               rate_hint_rps=rate_hint(e.plan)).rate_rps
        if config.try_prefill_first and _colocated_only(e.plan):
            alt = replace(e.sim, colocated_policy=ColocatedPolicy.PREFILL_FIRST)
            alt_rate = max_rate_at_slo(e.plan, e.cluster, model, workload, slo, alt, config.load,
                                       rate_hint_rps=best or None).rate_rps
            e.rate_by_policy = {str(e.sim.colocated_policy): best, str(alt.colocated_policy): alt_rate}
            if alt_rate > best:
                best, e.sim = alt_rate, alt
        e.max_rate_rps = best

    base = [e.max_rate_rps for e in entries if e.name in planners and e.name != THUNDERSERVE]
    main_ts = [e.max_rate_rps for e in entries if e.name == THUNDERSERVE]
    common = max(base, default=0.0) or max(main_ts, default=0.0) or max(e.max_rate_rps for e in entries)

    for e in entries:
        tick(f"{e.name} at {common:.2f} req/s")
        e.data = _measure(e, model, workload, slo, common, config)
    if config.curves:
        top = max(e.max_rate_rps for e in entries) or common
        rates = [round(top * f, 6) for f in RATE_GRID if top * f > 0]
        for e in entries:
            tick(f"attainment curve of {e.name}")
            e.data["attainment_vs_rate"] = [
                [r, compute_metrics(simulate_at_rate(e.plan, e.cluster, model, workload, r, e.sim, config.load),
                                    slo).slo_attainment] for r in rates]
    if progress is not None:
        progress(total, total, "done")
    return finite_json({
        "cluster": cluster.name,
        "model": model.name,
        "workload": workload.name,
        "cost_per_hour": cluster.cost_usd_per_hour,
        "systems": {e.name: e.data for e in entries},
    })


def finite_json(obj: Any) -> Any:
    """NaN and infinities become None (JSON has neither); numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def _measure(e: _Entry, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec, common_rps: float,
             config: CompareConfig) -> dict[str, Any]:
    """Metrics of one system: goodput at its own max rate, latency figures at the common rate."""
    own = None
    if e.max_rate_rps > 0:
        own = simulate_at_rate(e.plan, e.cluster, model, workload, e.max_rate_rps, e.sim, config.load)
    at = simulate_at_rate(e.plan, e.cluster, model, workload, common_rps, e.sim, config.load)
    out = system_entry(e.plan, e.cluster, slo, at, common_rps, e.max_rate_rps, own)
    out["decision_time_s"] = e.decision_time_s
    out["colocated_policy"] = str(e.sim.colocated_policy)
    if e.rate_by_policy:
        out["max_rate_by_colocated_policy"] = e.rate_by_policy
    return out


def system_entry(plan: Plan, cluster: Cluster, slo: SloSpec, at: SimResult, rate_rps: float,
                 max_rate_rps: float | None, at_max: SimResult | None = None) -> dict[str, Any]:
    """One system's figures: latency/attainment from the run `at` (at `rate_rps`), throughput from `at_max`
    (the run at its max rate at the SLO; `at` itself when not given)."""
    m = compute_metrics(at, slo)
    goodput = compute_metrics(at_max, slo) if at_max is not None else m
    out: dict[str, Any] = {
        "cluster": cluster.name,
        "cost_per_hour": cluster.cost_usd_per_hour,
        "max_rate_at_slo": max_rate_rps,
        "comparison_rate_rps": rate_rps,
        "throughput_rps": goodput.throughput_rps if max_rate_rps != 0 else 0.0,
        "throughput_tokens_s": goodput.throughput_tokens_s if max_rate_rps != 0 else 0.0,
        "slo_attainment": m.slo_attainment,
        "latency_deadline_scale": latency_deadline_scale(at, slo),
        "p50_ttft_s": m.ttft_s.p50, "p90_ttft_s": m.ttft_s.p90, "p99_ttft_s": m.ttft_s.p99,
        "p50_tpot_s": m.tpot_s.p50, "p90_tpot_s": m.tpot_s.p90, "p99_tpot_s": m.tpot_s.p99,
        "p99_e2e_s": m.e2e_s.p99,
        "num_requests": m.num_requests,
        "max_rate_per_dollar_hour": (max_rate_rps / cluster.cost_usd_per_hour
                                     if max_rate_rps is not None and cluster.cost_usd_per_hour > 0 else None),
        "num_groups": len(plan.groups),
        "phases": {str(p): len(plan.groups_in(p)) for p in Phase},
        "oversized_requests": at.oversized_requests,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "attainment_target": slo.attainment_target,
                "scale": slo.scale},
        "plan": plan.to_dict(),
    }
    base_scale = slo.scale if slo.scale is not None else 1.0
    att = attainment_vs_factor(at, slo, np.asarray(SCALE_GRID))
    out["attainment_vs_slo_scale"] = [[round(f * base_scale, 6), float(a)]
                                      for f, a in zip(SCALE_GRID, att, strict=True)]
    return out
