"""Baselines: plans validate and keep each system's defining restriction."""

from __future__ import annotations

import pytest

from builders import make_cluster
from thunderserve.cli.common import make_slo
from thunderserve.plan import Phase, validate_plan
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


def test_registry_names_the_three_systems() -> None:
    assert sorted(BASELINES) == ["distserve", "hexgen", "vllm"]


def test_even_layers_and_carving() -> None:
    assert even_layers(10, 3) == [(0, 4), (4, 7), (7, 10)]
    nodes = [["a:0", "a:1"], ["b:0", "b:1"]]
    assert carve(nodes, [Shape(2, 1), Shape(1, 2)]) == [[["a:0", "a:1"]], [["b:0"], ["b:1"]]]
    assert carve(nodes, [Shape(4, 1)]) is None


def test_vllm_never_splits_phases_and_never_mixes_types() -> None:
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
    # Slow cross-node links: DistServe's high-node-affinity placement keeps every KV transfer in a node.
    assert not fast_cross_node(CLUSTER, [["a:0", "a:1"], ["b:0", "b:1"]])
    for src, dests in plan.routing.kv.items():
        src_nodes = {CLUSTER.by_id[g].node for g in plan.group(src).gpus}
        for dst, share in dests.items():
            if share > 0:
                assert {CLUSTER.by_id[g].node for g in plan.group(dst).gpus} == src_nodes


def test_distserve_places_freely_on_a_fast_network() -> None:
    fast = make_cluster((("a", "A40", 2), ("b", "A40", 2)), default_gbps=200.0, gpu_types=())
    assert fast_cross_node(fast, [["a:0", "a:1"], ["b:0", "b:1"]])
    plan = plan_distserve(fast, MODEL, WORKLOAD, SLO)
    validate_plan(plan, fast, MODEL)
    assert plan.estimate["per_island"]["A40"]["placement"] == "low_node_affinity"


def test_hexgen_has_no_prefill_decode_split() -> None:
    plan = plan_hexgen(CLUSTER, MODEL, WORKLOAD, SLO, time_limit_s=2.0)
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
