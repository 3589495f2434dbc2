"""Baselines: plans validate and keep each system's defining restriction."""

from __future__ import annotations

import pytest

from builders import make_cluster
from thunderserve.cli.common import make_slo
from thunderserve.plan import Phase, Routing, validate_plan
from thunderserve.scheduler.baselines import BASELINES, plan_distserve, plan_hexgen, plan_vllm
from thunderserve.scheduler.baselines._common import Shape, carve, even_layers
from thunderserve.scheduler.baselines.distserve import fast_cross_node
from thunderserve.spec import load_cluster, load_model, load_workload

MODEL = load_model("llama-2-7b")
WORKLOAD = load_workload("conversation")
SLO = make_slo(MODEL, WORKLOAD, None, None, None, 0.9)
# Two GPU types, three nodes over two zones joined by 10 Gbps (no fast cross-node network).
CLUSTER = make_cluster((("a", "A40", 2), ("b", "A40", 2), ("c", "L40S", 2)), default_gbps=10.0, gpu_types=())


def types_of(plan, cluster) -> list[set[str]]:  # type: ignore[no-untyped-def]
    return [{cluster.by_id[g].spec.name for g in grp.gpus} for grp in plan.groups]


def test_registry_names_the_three_peers() -> None:
    assert sorted(BASELINES) == ["distserve", "hexgen", "vllm"]


def test_even_layers_and_carving() -> None:
    assert even_layers(10, 3) == [(0, 4), (4, 7), (7, 10)]
    nodes = [["a:0", "a:1"], ["b:0", "b:1"]]
    assert carve(nodes, [Shape(2, 1), Shape(1, 2)]) == [[["a:0", "a:1"]], [["b:0"], ["b:1"]]]
    assert carve(nodes, [Shape(4, 1)]) is None


def test_vllm_never_splits_phases_and_never_mixes_types(monkeypatch: pytest.MonkeyPatch) -> None:
    import thunderserve.scheduler.baselines.vllm as vllm_mod

    monkeypatch.setattr(vllm_mod, "SIMULATED_SHAPES", 1)  # fewer simulations: the claim does not depend on them
    plan = plan_vllm(CLUSTER, MODEL, WORKLOAD, SLO)
    validate_plan(plan, CLUSTER, MODEL)
    assert all(g.phase is Phase.COLOCATED for g in plan.groups)
    assert all(len(t) == 1 for t in types_of(plan, CLUSTER))
    assert plan.routing is not None and abs(sum(plan.routing.entry.values()) - 1) < 1e-9
    assert plan.estimate["system"] == "vllm" and set(plan.estimate["per_type"]) == {"A40", "L40S"}


def test_distserve_splits_phases_per_type_without_compression() -> None:
    plan = plan_distserve(CLUSTER, MODEL, WORKLOAD, SLO)
    validate_plan(plan, CLUSTER, MODEL)
    assert {g.phase for g in plan.groups} == {Phase.PREFILL, Phase.DECODE}
    assert all(len(t) == 1 for t in types_of(plan, CLUSTER))
    assert plan.kv_transfer.compression == "none"
    assert plan.routing is not None
    # Slow cross-node links: DistServe's low-node-affinity placement keeps every KV transfer in a node.
    assert not fast_cross_node(CLUSTER, [["a:0", "a:1"], ["b:0", "b:1"]])
    for src, dests in plan.routing.kv.items():
        src_nodes = {CLUSTER.by_id[g].node for g in plan.group(src).gpus}
        for dst, share in dests.items():
            if share > 0:
                assert {CLUSTER.by_id[g].node for g in plan.group(dst).gpus} == src_nodes


def test_distserve_places_freely_on_a_fast_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import thunderserve.scheduler.baselines.distserve as ds_mod

    monkeypatch.setattr(ds_mod, "SIMULATED_CANDIDATES", 2)  # the placement label does not depend on how many
    fast = make_cluster((("a", "A40", 2), ("b", "A40", 2)), default_gbps=200.0, gpu_types=())
    assert fast_cross_node(fast, [["a:0", "a:1"], ["b:0", "b:1"]])
    plan = plan_distserve(fast, MODEL, WORKLOAD, SLO)
    validate_plan(plan, fast, MODEL)
    assert plan.estimate["per_island"]["A40"]["placement"] == "high_node_affinity"  # DistServe's name for it


def test_hexgen_has_no_prefill_decode_split() -> None:
    plan = plan_hexgen(CLUSTER, MODEL, WORKLOAD, SLO, budget=40)
    validate_plan(plan, CLUSTER, MODEL)
    assert all(g.phase is Phase.COLOCATED for g in plan.groups)
    assert plan.estimate["system"] == "hexgen"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_baseline_plans_the_inhouse_cluster(name: str) -> None:
    cluster = load_cluster("inhouse-8xa100")
    model = load_model("llama-30b")
    slo = make_slo(model, WORKLOAD, None, None, None, 0.9)
    plan = BASELINES[name](cluster, model, WORKLOAD, slo)
    validate_plan(plan, cluster, model)
    assert plan.cluster == "inhouse-8xa100"


# -- each peer module's docstring claims, one test per claim ------------------------------------------------
def test_vllm_offers_every_standard_shape_including_pipelines_inside_and_across_nodes() -> None:
    from thunderserve.scheduler.baselines.vllm import vllm_shapes

    nodes = [["a:0", "a:1"], ["b:0", "b:1"]]
    shapes = {(s.tp, s.pp) for s in vllm_shapes(CLUSTER, MODEL, nodes)}
    assert {(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)} <= shapes  # PP even where one GPU holds the model
    two = carve(nodes, [Shape(1, 2)])
    assert two == [[["a:0"], ["a:1"]]]  # a 2-stage pipeline first fills one node (PP inside a node)


def test_vllm_and_distserve_run_behind_a_least_outstanding_balancer() -> None:
    from thunderserve.policy.routing import Dispatch
    from thunderserve.report.systems import SYSTEMS

    for name in ("vllm", "distserve"):
        assert SYSTEMS[name].dispatch is Dispatch.LEAST_OUTSTANDING
        assert SYSTEMS[name].kv_compression == "none"


def test_distserve_low_affinity_segments_keep_each_layers_kv_inside_its_node() -> None:
    from thunderserve.scheduler.baselines.distserve import IslandLayout, _carve_segments, segment_layouts

    slow = make_cluster((("a", "A40", 4), ("b", "A40", 4)), default_gbps=10.0, gpu_types=())
    nodes = [[f"a:{i}" for i in range(4)], [f"b:{i}" for i in range(4)]]
    layouts = segment_layouts(slow, MODEL, WORKLOAD, SLO, nodes)
    assert layouts and all(lay.pp_cross == 2 for lay in layouts)
    lay = IslandLayout(Shape(1, 1), Shape(1, 1), 0, 0, 0.0, 0.0, pp_cross=2)
    domains = _carve_segments(nodes, lay, MODEL.num_layers)
    assert domains is not None and len(domains) == 2  # two segment pairs fit per 4-GPU node
    for pre_insts, dec_insts in domains:
        (pre,), (dec,) = pre_insts, dec_insts
        assert [lr for _, lr in pre] == [lr for _, lr in dec]  # same layers per segment
        for (pg, _), (dg, _) in zip(pre, dec, strict=True):
            assert {slow.by_id[g].node for g in pg} == {slow.by_id[g].node for g in dg}


def test_distserve_low_affinity_plan_validates_and_names_its_placement() -> None:
    slow = make_cluster((("a", "A40", 4), ("b", "A40", 4)), default_gbps=10.0, gpu_types=())
    plan = plan_distserve(slow, MODEL, WORKLOAD, SLO)
    validate_plan(plan, slow, MODEL)
    assert plan.estimate["per_island"]["A40"]["placement"] == "low_node_affinity"
    assert plan.estimate["dispatch"] == "least_outstanding"


def test_hexgen_runtime_serves_one_request_per_call() -> None:
    import numpy as np

    from thunderserve.report.systems import SYSTEMS
    from thunderserve.sim import SimConfig, simulate

    sim = SYSTEMS["hexgen"].sim_config(SimConfig(warmup_s=0))
    assert sim.batching.max_batch_size == 1
    plan = plan_hexgen(CLUSTER, MODEL, WORKLOAD, SLO, budget=40)
    one = plan.groups[0].id
    single = plan.model_copy(update={"groups": (plan.groups[0],), "routing": Routing(entry={one: 1.0})})
    r = simulate(single, CLUSTER, MODEL, np.zeros(2), np.full(2, 64), np.full(2, 8), sim)
    assert r.first_token_s[1] >= r.finish_s[0]  # the second request starts after the first has finished


def test_every_searching_system_gets_the_same_budget_seed_and_verification() -> None:
    from thunderserve.report.systems import SYSTEMS, PlanKnobs

    knobs = PlanKnobs(budget=123, seed=7, verify_top=4)
    searching = [s for s in SYSTEMS.values() if s.searches]
    assert {s.name for s in searching} == {"thunderserve", "thunderserve-uncompressed", "thunderserve-colocated",
                                           "hexgen"}
    for s in searching:
        d = s.describe(knobs)
        assert (d["search_budget_evaluations"], d["seed"], d["verify_top"]) == (123, 7, 4)
    assert SYSTEMS["thunderserve-uncompressed"].kv_compression == "none"
    assert not SYSTEMS["thunderserve-colocated"].published and SYSTEMS["hexgen"].published
