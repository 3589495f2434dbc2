"""Invariants of the planner on random small clusters: every plan validates, evaluate_plan agrees with the
planner's own estimate, routing shares sum to 1, and a seed fixes the plan."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import TOY_GPU, make_cluster
from thunderserve.plan import Group, Phase, Plan, validate_plan
from thunderserve.scheduler import SchedulerConfig, evaluate_plan, plan_deployment, solve_routing
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.routing_lp import route
from thunderserve.spec import SloSpec, WorkloadSpec, load_model

GPUS: list[dict[str, Any]] = [
    {**TOY_GPU, "name": "G24", "memory_gb": 24, "fp16_tflops": 150, "memory_bandwidth_gbs": 900},
    {**TOY_GPU, "name": "G48", "memory_gb": 48, "fp16_tflops": 300, "memory_bandwidth_gbs": 800},
    {**TOY_GPU, "name": "G80", "memory_gb": 80, "fp16_tflops": 250, "memory_bandwidth_gbs": 2000},
]
MODEL = load_model("llama-2-7b")
rng = np.random.default_rng(7)
WORKLOAD = WorkloadSpec("prop", np.arange(300, dtype=float), np.clip(rng.lognormal(6, 0.8, 300), 8, 3000)
                        .astype(np.int64), np.clip(rng.lognormal(4, 0.9, 300), 1, 600).astype(np.int64))
SLO = SloSpec(ttft_ms=1500, tpot_ms=120, attainment_target=0.9)
CONFIG = SchedulerConfig(max_evaluations=100_000, max_iterations=25, patience=10, neighbourhood_size=6)

nodes_st = st.lists(st.tuples(st.sampled_from(["G24", "G48", "G80"]), st.integers(1, 3)), min_size=1, max_size=3)
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def build(nodes: list[tuple[str, int]], gbps: float):  # type: ignore[no-untyped-def]
    return make_cluster(tuple((f"n{i}", g, k) for i, (g, k) in enumerate(nodes)), default_gbps=gbps,
                        gpu_types=GPUS)


@SETTINGS
@given(nodes=nodes_st, gbps=st.sampled_from([5.0, 25.0, 100.0]))
def test_every_plan_validates_and_evaluates_to_its_own_estimate(nodes, gbps) -> None:  # type: ignore[no-untyped-def]
    cluster = build(nodes, gbps)
    result = plan_deployment(cluster, MODEL, WORKLOAD, SLO, CONFIG)
    plan = result.plan
    validate_plan(plan, cluster, MODEL)
    assert plan.routing is not None
    assert sum(plan.routing.entry.values()) == pytest.approx(1.0, abs=1e-9)
    for dests in plan.routing.kv.values():
        assert sum(dests.values()) == pytest.approx(1.0, abs=1e-9)
    doc = evaluate_plan(plan, cluster, MODEL, WORKLOAD, SLO)
    for key in ("max_rate_at_slo", "slo_attainment", "cost_per_hour", "ttft_p90_s", "tpot_mean_s"):
        assert doc[key] == plan.estimate[key]
    assert result.max_rate_at_slo == plan.estimate["max_rate_at_slo"]
    assert result.history == tuple(sorted(result.history))


@SETTINGS
@given(nodes=nodes_st, seed=st.integers(0, 3))
def test_same_seed_same_plan(nodes, seed) -> None:  # type: ignore[no-untyped-def]
    cluster = build(nodes, 25.0)
    cfg = SchedulerConfig(max_evaluations=100_000, max_iterations=15, patience=15, neighbourhood_size=5, seed=seed)
    a = plan_deployment(cluster, MODEL, WORKLOAD, SLO, cfg).plan
    b = plan_deployment(cluster, MODEL, WORKLOAD, SLO, cfg).plan
    assert a.to_json() == b.to_json()


@SETTINGS
@given(nodes=nodes_st, phases=st.lists(st.sampled_from(list(Phase)), min_size=1, max_size=9))
def test_routing_shares_always_sum_to_one(nodes, phases) -> None:  # type: ignore[no-untyped-def]
    cluster = build(nodes, 25.0)
    ctx = PlanningContext(cluster, MODEL, WORKLOAD, SLO)
    groups = []
    for i, g in enumerate(cluster.gpus):
        lay = ctx.layout(frozenset({g.id}), phases[i % len(phases)])
        if lay is not None:
            groups.append(Group(id=f"g{i}", phase=phases[i % len(phases)], stages=lay.stages))
    takes = [g for g in groups if g.takes_requests]
    has_decode = any(g.phase is Phase.DECODE for g in groups)
    if not takes or (not has_decode and all(g.phase is Phase.PREFILL for g in takes)):
        return
    groups = [g for g in groups if g.phase is not Phase.PREFILL or has_decode]
    routing = route(ctx, groups).routing()
    assert sum(routing.entry.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(v > 0 for v in routing.entry.values())
    for dests in routing.kv.values():
        assert sum(dests.values()) == pytest.approx(1.0, abs=1e-9)
    plan = Plan(model=MODEL.name, cluster=cluster.name, groups=tuple(groups),
                kv_transfer={"compression": ctx.compression})
    again = solve_routing(plan, cluster, MODEL, WORKLOAD, SLO)
    assert again == routing, (again, routing)
    validate_plan(plan.model_copy(update={"routing": routing}), cluster, MODEL)


def test_time_limit_is_respected() -> None:
    cluster = build([("G48", 3), ("G24", 3), ("G80", 2)], 25.0)
    t0 = time.monotonic()
    plan_deployment(cluster, MODEL, WORKLOAD, SLO, SchedulerConfig(time_limit_s=1.0, patience=10_000,
                                                                   max_iterations=10_000, max_evaluations=10**9))
    assert time.monotonic() - t0 < 6.0  # the search stops at the limit; the final estimate takes a moment
