"""Re-planning: lightweight keeps layouts (no reload) and is fast; full search restarts everything."""

from __future__ import annotations

import pytest

from builders import make_cluster
from thunderserve.costmodel.reference import slo_from_scale
from thunderserve.plan import Phase, validate_plan
from thunderserve.resched import cluster_without, diff_plans, full_replan, lightweight_replan
from thunderserve.scheduler import SchedulerConfig, plan_deployment
from thunderserve.spec import load_model, load_workload

MODEL = load_model("llama-2-7b")
A40 = (("a", "A40", 2), ("b", "A40", 2), ("c", "A40", 2), ("d", "A40", 2))


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    cluster = make_cluster(A40, default_gbps=25)
    workload = load_workload("conversation")
    slo = slo_from_scale(MODEL, workload, 5.0)
    plan = plan_deployment(cluster, MODEL, workload, slo, SchedulerConfig(max_evaluations=100_000, max_iterations=30, seed=1)).plan
    return cluster, workload, slo, plan


def test_node_failure_drops_only_the_damaged_groups(setup) -> None:  # type: ignore[no-untyped-def]
    cluster, workload, slo, plan = setup
    survivors = cluster_without(cluster, {"a:0", "a:1"})
    result = lightweight_replan(plan, survivors, MODEL, workload, slo)
    validate_plan(result.plan, survivors, MODEL)
    assert not set(result.plan.gpus) & {"a:0", "a:1"}
    kept = {g.stages for g in plan.groups if not set(g.gpus) & {"a:0", "a:1"}}
    assert kept <= {g.stages for g in result.plan.groups}  # surviving layouts unchanged
    assert not any(c.reloads_weights for c in result.changes if c.kind != "relayout")
    assert 0 < result.max_rate_at_slo <= plan.estimate["max_rate_at_slo"] + 1e-9


def test_workload_shift_only_flips_and_reroutes(setup) -> None:  # type: ignore[no-untyped-def]
    cluster, _, slo, plan = setup
    coding = load_workload("coding")
    result = lightweight_replan(plan, cluster, MODEL, coding, slo)
    assert {g.stages for g in result.plan.groups} == {g.stages for g in plan.groups}
    assert {c.kind for c in result.changes} <= {"flip", "routing"}
    assert not any(c.reloads_weights for c in result.changes)


def test_full_replan_restarts_with_reload(setup) -> None:  # type: ignore[no-untyped-def]
    cluster, workload, slo, plan = setup
    survivors = cluster_without(cluster, {"d:0", "d:1"})
    result = full_replan(plan, survivors, MODEL, workload, slo, SchedulerConfig(max_evaluations=100_000, max_iterations=30, seed=1))
    validate_plan(result.plan, survivors, MODEL)
    assert result.changes[0].kind == "restart" and result.changes[0].reloads_weights
    assert result.apply_time_s > 15


def test_diff_reports_phase_flips(setup) -> None:  # type: ignore[no-untyped-def]
    cluster, _, _, plan = setup
    g = plan.groups[0]
    other = Phase.DECODE if g.phase is not Phase.DECODE else Phase.PREFILL
    flipped = plan.model_copy(update={"groups": (g.with_phase(other),) + plan.groups[1:]})
    kinds = [(c.kind, c.group, c.reloads_weights) for c in diff_plans(plan, flipped, MODEL, cluster)]
    assert ("flip", g.id, False) in kinds


def test_added_gpus_form_a_new_group(setup, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from thunderserve.resched.events import cluster_with_added

    cluster, workload, slo, plan = setup
    node = tmp_path / "node.yaml"
    node.write_text("{name: e, gpu: A40, count: 2, zone: e}\n")
    grown = cluster_with_added(cluster, str(node))
    result = lightweight_replan(plan, grown, MODEL, workload, slo, added_gpus=frozenset({"e:0", "e:1"}))
    validate_plan(result.plan, grown, MODEL)
    added = [c for c in result.changes if c.kind == "add"]
    assert len(added) == 1 and added[0].reloads_weights
    assert {"e:0", "e:1"} <= set(result.plan.gpus)
