"""The planner's analytic estimate against the simulator, and simulated re-scoring of candidate plans."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sim_builders import MODEL, colocated_plan, constant_workload, disagg_plan, two_node_cluster

from thunderserve.cli.common import make_slo
from thunderserve.sim import LoadConfig, SimConfig, max_rate_at_slo, rescore
from thunderserve.spec import load_cluster, load_model, load_workload, resolve_cluster
from thunderserve.spec.slo import SloSpec

AGREEMENT = 0.10  # |estimate - simulated| / simulated (issue 11 target)


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


def _generated(size: int, seed: int):  # type: ignore[no-untyped-def]
    """A generated heterogeneous cluster (`benchmarks/gen_cluster.py`, the scheduler benchmark's generator)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    try:
        from gen_cluster import generate_cluster
    finally:
        sys.path.pop(0)
    return resolve_cluster(generate_cluster(size, seed=seed))


@pytest.mark.slow
@pytest.mark.parametrize(("cluster_name", "workload"), [("paper-cloud-32", "coding"),
                                                        ("paper-cloud-32", "conversation"),
                                                        ("gen-32-s1", "conversation"),
                                                        ("gen-48-s2", "conversation")])
def test_planner_estimate_is_within_10_percent_of_the_simulated_max_rate(cluster_name: str, workload: str) -> None:
    from thunderserve.scheduler import estimate_max_rate, plan_deployment

    if cluster_name.startswith("gen-"):
        _, size, seed = cluster_name.split("-")
        cluster = _generated(int(size), int(seed.removeprefix("s")))
    else:
        cluster = load_cluster(cluster_name)
    model, wl = load_model("llama-30b"), load_workload(workload)
    slo = make_slo(model, wl, None, None, None, 0.9)
    plan = plan_deployment(cluster, model, wl, slo).plan
    estimate = estimate_max_rate(plan, cluster, model, wl, slo)
    simulated = max_rate_at_slo(plan, cluster, model, wl, slo, rate_hint_rps=estimate).rate_rps
    assert simulated > 0
    assert abs(estimate - simulated) / simulated <= AGREEMENT, (
        f"{cluster_name}/{workload}: planner estimate {estimate:.3f} req/s vs simulated {simulated:.3f} req/s")
