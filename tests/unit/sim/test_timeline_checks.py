"""The rescheduling issue's done-when checks on paper-cloud-32 (llama-30b), slow: planner runs and
20-minute simulations (see sim.resched_scenarios; `benchmarks/bench_resched.py` prints the same figures)."""

from __future__ import annotations

import pytest

from thunderserve.cli.common import make_slo
from thunderserve.sim.resched_scenarios import (
    Planner,
    ScenarioConfig,
    ScenarioResult,
    failure_scenario,
    shift_scenario,
    steady_scenario,
)
from thunderserve.spec import load_cluster, load_model, load_workload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # planner runs and 20-minute simulations

CFG = ScenarioConfig()


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    """(cluster, model, SLO fixed from coding at 5x, planner), loaded only when the slow tests run."""
    cluster, model = load_cluster("paper-cloud-32"), load_model("llama-30b")
    slo = make_slo(model, load_workload("coding"), None, None, None, 0.9)
    return cluster, model, slo, Planner(model, slo, CFG.scheduler)


@pytest.fixture(scope="module")
def shift(setup) -> ScenarioResult:  # type: ignore[no-untyped-def]
    cluster, model, slo, planner = setup
    return shift_scenario(cluster, model, slo, load_workload("coding"), load_workload("conversation"), CFG,
                          planner)


def failed(res: ScenarioResult) -> list[str]:
    return [f"{c['name']}: {c['measured']} (target {c['target']})" for c in res.checks if c["ok"] is not True]


def test_shift_rate_is_served_by_the_coding_plan_and_lightweight_beats_doing_nothing(shift: ScenarioResult) -> None:
    assert shift.facts["initial_plan_meets_slo_at_rate"]
    pol = shift.doc["policies"]
    assert pol["lightweight"]["final_window_attainment"] > pol["none"]["final_window_attainment"] + 0.3
    assert pol["lightweight"]["replans"][0]["cause"] == "workload shift"
    assert pol["none"]["unfinished"] == pol["lightweight"]["unfinished"] == 0


def test_shift_lightweight_restores_within_60s_and_reaches_90pct_of_a_fresh_plan(shift: ScenarioResult) -> None:
    assert not failed(shift), failed(shift)


@pytest.mark.parametrize("workload", ["conversation", "coding"])
def test_after_a_node_failure_lightweight_reaches_90pct_of_a_fresh_plan(setup, workload: str) -> None:  # type: ignore[no-untyped-def]
    cluster, model, slo, planner = setup
    res = failure_scenario(cluster, model, slo, load_workload(workload), "n3", CFG, planner)
    assert res.facts["plan_gpus_on_failed_node"]  # the failure hits the plan
    assert not failed(res), failed(res)


@pytest.mark.parametrize("workload", ["coding", "conversation"])
def test_steady_load_for_30_minutes_triggers_no_reschedule(setup, shift: ScenarioResult,
                                                           workload: str) -> None:  # type: ignore[no-untyped-def]
    cluster, model, slo, planner = setup
    res = steady_scenario(cluster, model, slo, load_workload(workload), shift.rate_rps, CFG, planner)
    assert res.doc["duration_s"] == 1800.0
    assert not failed(res), failed(res)
