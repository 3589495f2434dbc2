"""The analytic estimate: monotone in rate, max rate consistent with attainment, evaluate/orchestrate
contracts, one-line errors, and agreement with the simulator on small plans."""

from __future__ import annotations

import json
import math

import pytest
from sched_builders import cluster, loose_slo, synthetic_workload

from thunderserve.errors import InfeasibleError, PlanError
from thunderserve.plan import Group, Phase, Plan, Routing, Stage, validate_plan
from thunderserve.scheduler import (
    SchedulerConfig,
    estimate_attainment,
    estimate_max_rate,
    evaluate_plan,
    plan_deployment,
    solve_routing,
)
from thunderserve.scheduler.api import orchestrate
from thunderserve.sim import LoadConfig, SimConfig, max_rate_at_slo
from thunderserve.spec import SloSpec, load_model

LLAMA7 = load_model("llama-2-7b")
L = LLAMA7.num_layers
WL = synthetic_workload()
SLO = loose_slo()
ESTIMATE_KEYS = {"max_rate_at_slo", "slo_attainment", "rate_rps", "cost_per_hour", "ttft_p90_s", "tpot_mean_s"}


def group(gid: str, phase: str, *gpus: str) -> Group:
    return Group(id=gid, phase=Phase(phase), stages=(Stage(gpus=tuple(gpus), layers=(0, L)),))


def disagg_plan() -> tuple[Plan, object]:
    c = cluster((("a", "FAST", 1), ("b", "TOY", 2)), default_gbps=25)
    plan = Plan(model=LLAMA7.name, cluster=c.name, kv_transfer={"compression": "int4"},
                groups=(group("p0", "prefill", "a:0"), group("d0", "decode", "b:0", "b:1")),
                routing=Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}}))
    return plan, c


def test_attainment_falls_with_rate_and_max_rate_is_its_threshold() -> None:
    plan, c = disagg_plan()
    rates = [0.5, 2.0, 5.0, 10.0, 20.0, 40.0]
    att = [estimate_attainment(plan, c, LLAMA7, WL, SLO, r) for r in rates]
    assert all(a >= b - 1e-9 for a, b in itertools_pairs(att))
    assert att[0] > 0.95 and att[-1] < 0.5
    mr = estimate_max_rate(plan, c, LLAMA7, WL, SLO)
    assert estimate_attainment(plan, c, LLAMA7, WL, SLO, mr) >= SLO.attainment_target - 1e-9
    assert estimate_attainment(plan, c, LLAMA7, WL, SLO, mr * 1.01) < SLO.attainment_target


def itertools_pairs(xs):  # type: ignore[no-untyped-def]
    return zip(xs, xs[1:], strict=False)


def test_evaluate_solves_missing_routing_and_reports_json_safe_fields() -> None:
    plan, c = disagg_plan()
    bare = plan.model_copy(update={"routing": None})
    doc = evaluate_plan(bare, c, LLAMA7, WL, SLO)
    assert doc["feasible"] is True and doc["routing_solved"] is True
    assert ESTIMATE_KEYS <= doc.keys()
    assert doc["phases"] == {"prefill": 1, "decode": 1, "colocated": 0}
    assert doc["cost_per_hour"] == pytest.approx(3.0)
    json.dumps(doc, allow_nan=False)
    at = evaluate_plan(plan, c, LLAMA7, WL, SLO, rate_rps=1.0)
    assert at["rate_rps"] == 1.0 and at["slo_attainment"] > 0.95


def test_evaluate_rejects_invalid_plans_with_one_line_errors() -> None:
    plan, c = disagg_plan()
    wrong_gpu = plan.model_copy(update={"groups": (group("p0", "prefill", "zz:0"), plan.groups[1])})
    with pytest.raises(PlanError, match=r"^groups\.p0\.stages\.0\.gpus: GPU 'zz:0' is not in cluster test$"):
        evaluate_plan(wrong_gpu, c, LLAMA7, WL, SLO)
    with pytest.raises(PlanError, match="^model: plan is for 'llama-2-7b', not 'llama-2-13b'$"):
        evaluate_plan(plan, c, load_model("llama-2-13b"), WL, SLO)
    with pytest.raises(PlanError, match="rate: must be positive"):
        evaluate_plan(plan, c, LLAMA7, WL, SLO, rate_rps=0)


def test_orchestrate_chooses_phases_and_routes() -> None:
    c = cluster((("a", "FAST", 2), ("b", "SLOW", 2)), default_gbps=25)
    groups = [group("g0", "colocated", "a:0"), group("g1", "colocated", "a:1"), group("g2", "colocated", "b:0"),
              group("g3", "colocated", "b:1")]
    plan = orchestrate(groups, c, LLAMA7, WL, SLO)
    validate_plan(plan, c, LLAMA7)
    assert ESTIMATE_KEYS <= plan.estimate.keys()
    assert plan.estimate["max_rate_at_slo"] == pytest.approx(estimate_max_rate(plan, c, LLAMA7, WL, SLO))
    fixed = orchestrate(groups, c, LLAMA7, WL, SLO, fix_phases=True)
    assert [g.phase for g in fixed.groups] == [Phase.COLOCATED] * 4
    # free phase choice is at least as good as keeping every group colocated
    assert plan.estimate["lp_rate_rps"] >= fixed.estimate["lp_rate_rps"] * (1 - 1e-6)
    only_disagg = orchestrate(groups, c, LLAMA7, WL, SLO, phases=(Phase.PREFILL, Phase.DECODE))
    assert {g.phase for g in only_disagg.groups} <= {Phase.PREFILL, Phase.DECODE}


def test_model_that_cannot_fit_is_infeasible_with_a_clear_message() -> None:
    c = cluster((("t", "TINY", 2),))
    with pytest.raises(InfeasibleError) as err:
        plan_deployment(c, LLAMA7, WL, SLO, SchedulerConfig(time_limit_s=5))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("model llama-2-7b (13.5 GB of weights) cannot fit on cluster test (2 GPUs")


def test_an_unmeetable_slo_still_gives_a_valid_plan_with_rate_zero() -> None:
    c = cluster((("a", "FAST", 2), ("b", "SLOW", 2)), default_gbps=25)
    impossible = SloSpec(ttft_ms=1.0, tpot_ms=0.5, attainment_target=0.9)
    result = plan_deployment(c, LLAMA7, WL, impossible, SchedulerConfig(max_evaluations=100_000, max_iterations=30))
    validate_plan(result.plan, c, LLAMA7)
    est = result.plan.estimate
    assert est["max_rate_at_slo"] == 0.0 and result.max_rate_at_slo == 0.0
    assert est["slo_attainment"] < 0.9
    json.dumps(est, allow_nan=False)


def test_estimate_at_an_overloaded_rate_has_null_latencies() -> None:
    plan, c = disagg_plan()
    doc = evaluate_plan(plan, c, LLAMA7, WL, SLO, rate_rps=1e4)
    assert doc["slo_attainment"] == pytest.approx(0.0, abs=1e-6)
    assert doc["ttft_p90_s"] is None or math.isfinite(doc["ttft_p90_s"])
    json.dumps(doc, allow_nan=False)


@pytest.mark.parametrize("which", ["disaggregated", "colocated"])
def test_estimate_agrees_with_the_simulator_on_small_plans(which: str) -> None:
    plan, c = disagg_plan()
    if which == "colocated":
        plan = Plan(model=LLAMA7.name, cluster=c.name, groups=(group("c0", "colocated", "a:0"),
                                                               group("c1", "colocated", "b:0", "b:1")))
        plan = plan.model_copy(update={"routing": solve_routing(plan, c, LLAMA7, WL, SLO)})
    est = estimate_max_rate(plan, c, LLAMA7, WL, SLO)
    sim = max_rate_at_slo(plan, c, LLAMA7, WL, SLO, SimConfig(warmup_s=20.0),
                          LoadConfig(duration_s=200.0, min_requests=1500, rate_tolerance=0.03),
                          rate_hint_rps=est).rate_rps
    assert sim > 0
    assert abs(est - sim) / sim <= 0.2, f"{which}: estimate {est:.2f} vs simulated {sim:.2f} req/s"
