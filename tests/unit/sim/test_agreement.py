"""The planner's analytic estimate against the simulator, and simulated re-scoring of candidate plans."""

from __future__ import annotations

import pytest
from sim_builders import MODEL, colocated_plan, constant_workload, disagg_plan, two_node_cluster

from thunderserve.cli.common import make_slo
from thunderserve.sim import LoadConfig, SimConfig, max_rate_at_slo, rescore
from thunderserve.spec import load_cluster, load_model, load_workload
from thunderserve.spec.slo import SloSpec

AGREEMENT = 0.15  # |estimate - simulated| / simulated


def test_rescore_simulates_each_plan_and_scores_invalid_ones_zero() -> None:
    cluster = two_node_cluster()
    wl = constant_workload(500, 10)
    slo = SloSpec(ttft_ms=5.0, tpot_ms=1.0, attainment_target=0.9)
    bad = disagg_plan().model_copy(update={"model": "other"})
    load = LoadConfig(duration_s=5.0, min_requests=300, rate_tolerance=0.05)
    cfg = SimConfig(warmup_s=0.5)
    seen: list[tuple[int, int]] = []
    scores = rescore([colocated_plan(), bad, disagg_plan()], cluster, MODEL, wl, slo, config=cfg, load=load,
                     progress=lambda i, n: seen.append((i, n)))
    assert scores[1] == 0.0 and scores[0] > 0 and scores[2] > 0
    assert scores[0] == max_rate_at_slo(colocated_plan(), cluster, MODEL, wl, slo, cfg, load).rate_rps
    assert seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="one entry per plan"):
        rescore([colocated_plan()], cluster, MODEL, wl, slo, rate_hints_rps=[1.0, 2.0])


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["coding", "conversation"])
def test_planner_estimate_is_within_15_percent_of_the_simulated_max_rate(workload: str) -> None:
    from thunderserve.scheduler import estimate_max_rate, plan_deployment

    cluster, model, wl = load_cluster("paper-cloud-32"), load_model("llama-30b"), load_workload(workload)
    slo = make_slo(model, wl, None, None, None, 0.9)
    plan = plan_deployment(cluster, model, wl, slo).plan
    estimate = estimate_max_rate(plan, cluster, model, wl, slo)
    simulated = max_rate_at_slo(plan, cluster, model, wl, slo, rate_hint_rps=estimate).rate_rps
    assert simulated > 0
    assert abs(estimate - simulated) / simulated <= AGREEMENT, (
        f"{workload}: planner estimate {estimate:.3f} req/s vs simulated {simulated:.3f} req/s")
