"""Side-by-side comparison: every system of `report.systems.SYSTEMS` planned on the same GPUs and simulated alike.

Protocol:
  1. Plan each system with what `SYSTEMS` says it is given (searching systems share one budget, seed and
     `verify_top`); with a baseline cluster, every system is planned there too (entries `<system>@<cluster>`).
  2. `max_rate_at_slo` of each plan by simulation (see `sim.metrics`: Poisson arrivals, warm-up, bisection),
     each with its own simulator knobs (dispatch, batching); colocated-only plans are also tried with every
     colocated policy the system allows, keeping the better.
  3. The comparison rate is the best published peer's max rate on the main cluster (else the best system's).
     At that common rate each system reports SLO attainment, p50/p90/p99 TTFT and TPOT and its latency deadline
     (smallest SLO scale meeting the attainment target).
  4. Throughput (requests/s and output tokens/s) is measured at each system's own max rate at the SLO.
  5. Curves for the plot: attainment vs rate on a common grid, attainment vs SLO scale at the common rate.
  6. `summary`: ThunderServe's ratios to each published peer (max rate; latency deadline, peer / ours).
Each system's entry carries `config`: what it was given (`SystemSpec.describe`) and what it ran (shapes per GPU
type, groups by phase, KV compression, dispatch, colocated policy, batching knobs).
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
from thunderserve.report.systems import (
    DEFAULT_SYSTEMS,
    PUBLISHED_PEERS,
    THUNDERSERVE,
    PlanKnobs,
    SystemSpec,
    per_level_systems,
    system,
)
from thunderserve.scheduler.config import DEFAULT_MAX_EVALUATIONS
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

ProgressFn = Callable[[int, int, str], None]  # (units done, units in all, what is running)
RATE_GRID = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.15, 1.3)  # x the fastest system's max rate
SCALE_GRID = tuple(float(x) for x in np.round(np.geomspace(0.1, 4.0, 24), 4))  # x the SLO's own targets


@dataclass(frozen=True)
class CompareConfig:
    load: LoadConfig = field(default_factory=LoadConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    systems: tuple[str, ...] = DEFAULT_SYSTEMS  # names in SYSTEMS or thunderserve-<level>
    per_kv_level: bool = True  # also ThunderServe once per KV compression level the gate allows
    budget: int = DEFAULT_MAX_EVALUATIONS  # search budget of every system that searches (states scored)
    planner_time_limit_s: float | None = None  # optional wall-clock cap of those searches
    try_prefill_first: bool = True  # colocated-only plans also run prefill-first where the system allows it
    curves: bool = True
    seed: int = 0
    verify_top: int = 0  # every searching system re-scores its K best candidates by simulation (0: off)
    kv_compression: Compression | None = None  # ThunderServe's level when forced (None: the KV gate decides)

    @property
    def knobs(self) -> PlanKnobs:
        return PlanKnobs(budget=self.budget, seed=self.seed, verify_top=self.verify_top,
                         time_limit_s=self.planner_time_limit_s,
                         kv_compression=None if self.kv_compression is None else str(self.kv_compression))


def system_names(config: CompareConfig, model: ModelSpec) -> list[str]:
    """The systems compared, in report order (per-level ThunderServe entries after the default one)."""
    names = list(config.systems)
    if config.per_kv_level and THUNDERSERVE in names:
        at = names.index(THUNDERSERVE) + 1
        for extra in per_level_systems(model):
            if extra not in names:
                names.insert(at, extra)
                at += 1
    for n in names:
        system(n)  # SpecError on an unknown name
    return names


@dataclass
class _Entry:
    name: str
    spec: SystemSpec
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
                   specs: dict[str, SystemSpec] | None = None,
                   progress: ProgressFn | None = None) -> dict[str, Any]:
    """Plan, simulate and compare every system; returns the `compare --json` document. `specs` replaces the
    systems of `config` (tests, custom planners)."""
    if specs is None:
        specs = {n: system(n, model) for n in system_names(config, model)}
    jobs: list[tuple[str, Cluster, SystemSpec]] = [(n, cluster, s) for n, s in specs.items()]
    if baseline_cluster is not None:
        jobs += [(f"{n}@{baseline_cluster.name}", baseline_cluster, s) for n, s in specs.items()]
    per_entry = 3 + (1 if config.curves else 0)
    total = len(jobs) * per_entry
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        if progress is not None:
            progress(done, total, what)
        done += 1

    knobs = config.knobs
    entries: list[_Entry] = []
    memo: dict[Any, Plan] = {}
    for name, cl, spec in jobs:
        tick(f"planning {name}")
        sim = spec.sim_config(config.sim)
        t0 = time.perf_counter()
        plan = spec.plan(cl, model, workload, slo, knobs, sim, memo)
        entries.append(_Entry(name, spec, cl, plan, time.perf_counter() - t0, sim))

    for e in entries:
        tick(f"max rate of {e.name}")
        policies = [ColocatedPolicy(p) for p in e.spec.colocated_policies] \
            if config.try_prefill_first and _colocated_only(e.plan) else []
        policies = policies or [e.sim.colocated_policy]  # the comparison's own (a user's explicit choice)
        best, best_sim, hint = -1.0, e.sim, rate_hint(e.plan)
        for policy in policies:
            sim = replace(e.sim, colocated_policy=policy)
            rate = max_rate_at_slo(e.plan, e.cluster, model, workload, slo, sim, config.load,
                                   rate_hint_rps=hint).rate_rps
            if len(policies) > 1:
                e.rate_by_policy[str(policy)] = rate
            if rate > best:
                best, best_sim = rate, sim
            hint = best or hint
        e.max_rate_rps, e.sim = max(best, 0.0), best_sim

    peers = [e.max_rate_rps for e in entries if e.name in PUBLISHED_PEERS]
    common = max(peers, default=0.0) or max((e.max_rate_rps for e in entries if "@" not in e.name), default=0.0) \
        or max(e.max_rate_rps for e in entries)

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
    for e in entries:
        e.data["config"] = {**e.spec.describe(knobs), **ran_config(e.plan, e.cluster, e.sim)}
    if progress is not None:
        progress(total, total, "done")
    systems = {e.name: e.data for e in entries}
    return finite_json({
        "cluster": cluster.name,
        "model": model.name,
        "workload": workload.name,
        "cost_per_hour": cluster.cost_usd_per_hour,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "attainment_target": slo.attainment_target,
                "scale": slo.scale},
        "common_rate_rps": common,
        "systems": systems,
        "summary": summary(systems, baseline_cluster.name if baseline_cluster is not None else None),
    })


def ran_config(plan: Plan, cluster: Cluster, sim: SimConfig) -> dict[str, Any]:
    """What a plan ran with: groups by phase and shape, per-type choices of the baselines, KV compression,
    dispatch, colocated policy and batching knobs."""
    shapes: dict[str, int] = {}
    for g in plan.groups:
        types = "+".join(sorted({cluster.by_id[x].spec.name for x in g.gpus}))
        tps = "/".join(str(len(s.gpus)) for s in g.stages)
        key = f"{g.phase}: {types} TP {tps} x PP {len(g.stages)}"
        shapes[key] = shapes.get(key, 0) + 1
    out: dict[str, Any] = {
        "groups": dict(sorted(shapes.items())),
        "plan_kv_compression": str(plan.kv_transfer.compression),
        "dispatch": str(sim.dispatch),
        "colocated_policy": str(sim.colocated_policy),
        "max_num_seqs": sim.batching.max_batch_size,
        "prefill_token_budget": sim.batching.prefill_token_budget,
        "chunk_token_budget": sim.batching.chunk_token_budget,
    }
    for key in ("per_type", "per_island"):
        if key in plan.estimate:
            out[key] = plan.estimate[key]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def summary(systems: dict[str, dict[str, Any]], baseline_cluster: str | None) -> dict[str, Any]:
    """ThunderServe's ratios to every other system on the main cluster (max rate: ours / theirs; latency
    deadline: theirs / ours, > 1 meaning ours meets a tighter deadline) and, with a baseline cluster, to every
    system there (the paper's framing: ours on the cloud vs each system on the in-house cluster, same price)."""
    ts = systems.get(THUNDERSERVE)
    if ts is None:
        return {}
    rows: dict[str, dict[str, float | None]] = {}
    for name, s in systems.items():
        if name == THUNDERSERVE:
            continue
        rows[name] = {"max_rate_ratio": _ratio(ts["max_rate_at_slo"], s["max_rate_at_slo"]),
                      "deadline_ratio": _ratio(s["latency_deadline_scale"], ts["latency_deadline_scale"])}
    peers = [rows[p] for p in PUBLISHED_PEERS if p in rows]
    out: dict[str, Any] = {"vs": rows}
    for key in ("max_rate_ratio", "deadline_ratio"):
        vals = [v for r in peers if (v := r[key]) is not None]
        out[f"peers_mean_{key}"] = float(np.mean(vals)) if vals else None
        out[f"peers_max_{key}"] = max(vals) if vals else None
        ours = [v for n, r in rows.items() if "@" not in n and (v := r[key]) is not None]
        out[f"min_{key}_vs_any"] = min(ours) if ours else None
    if baseline_cluster is not None:
        home = [rows[f"{p}@{baseline_cluster}"] for p in PUBLISHED_PEERS if f"{p}@{baseline_cluster}" in rows]
        vals = [v for r in home if (v := r["max_rate_ratio"]) is not None]
        out["vs_peers_at_baseline_cluster_mean_max_rate_ratio"] = float(np.mean(vals)) if vals else None
    return out


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
    out["dispatch"] = str(e.sim.dispatch)
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
        "preemptions": at.preemptions,  # running requests preempted for KV blocks (recomputed), whole run
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "attainment_target": slo.attainment_target,
                "scale": slo.scale},
        "plan": plan.to_dict(),
    }
    base_scale = slo.scale if slo.scale is not None else 1.0
    att = attainment_vs_factor(at, slo, np.asarray(SCALE_GRID))
    out["attainment_vs_slo_scale"] = [[round(f * base_scale, 6), float(a)]
                                      for f, a in zip(SCALE_GRID, att, strict=True)]
    return out
