"""The estimate's network sharing: KV links crossing one NIC slow each other; disjoint ones do not."""

from __future__ import annotations

import pytest
from sched_builders import cluster, context

from builders import make_plan
from thunderserve.scheduler.estimate import _network_slowdowns, attainment


def _two_links(prefill: tuple[str, str]):  # type: ignore[no-untyped-def]
    groups = [("p0", "prefill", [[prefill[0]]], [0, 32]), ("p1", "prefill", [[prefill[1]]], [0, 32]),
              ("d0", "decode", [["c:0"]], [0, 32]), ("d1", "decode", [["d:0"]], [0, 32])]
    return make_plan(groups, model="llama-2-7b", entry={"p0": 0.5, "p1": 0.5},
                     kv={"p0": {"d0": 1.0}, "p1": {"d1": 1.0}}, compression="none")


def test_links_out_of_one_node_share_its_nic_in_the_estimate() -> None:
    c = cluster((("a", "TOY", 2), ("b", "TOY", 1), ("c", "TOY", 1), ("d", "TOY", 1)), default_gbps=10.0)
    ctx = context(c, compression="none")
    shared, apart = _two_links(("a:0", "a:1")), _two_links(("a:0", "b:0"))
    s_shared = _network_slowdowns(ctx, shared, 1.0)
    s_apart = _network_slowdowns(ctx, apart, 1.0)
    assert s_shared[("p0", "d0")] > s_apart[("p0", "d0")] > 1.0
    assert _network_slowdowns(ctx, shared, 0.0)[("p0", "d0")] == pytest.approx(1.0)
    # the NIC of node a carries twice the load: its utilisation, hence the slowdown, is higher
    assert attainment(ctx, shared, 1.0) <= attainment(ctx, apart, 1.0)
    assert _network_slowdowns(ctx, shared, 1e3)[("p0", "d0")] == float("inf")


def test_kv_goes_segment_by_segment_as_in_the_simulator() -> None:
    """Prefill and decode pipelines with a segment of the same layers on each of two nodes keep KV inside the
    nodes (DistServe's low-affinity placement): the estimate prices it by the fast intra-node links, not the
    slow link between the nodes; a decode layout with other layer splits pays the cross-node link."""
    from thunderserve.plan import Stage

    c = cluster((("a", "TOY", 2), ("b", "TOY", 2)), default_gbps=1.0)
    ctx = context(c, compression="none")
    pre = (Stage(gpus=("a:0",), layers=(0, 16)), Stage(gpus=("b:0",), layers=(16, 32)))
    aligned = (Stage(gpus=("a:1",), layers=(0, 16)), Stage(gpus=("b:1",), layers=(16, 32)))
    crossed = (Stage(gpus=("b:1",), layers=(0, 16)), Stage(gpus=("a:1",), layers=(16, 32)))
    assert ctx.seconds_per_token(pre, aligned) < ctx.seconds_per_token(pre, crossed) / 5
