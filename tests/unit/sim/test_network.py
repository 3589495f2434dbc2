"""Shared network: concurrent KV transfers share NICs and zone paths (max-min fair, event-driven)."""

from __future__ import annotations

import numpy as np
import pytest
from sim_builders import MODEL, requests

from builders import TOY_GPU, make_cluster, make_plan
from thunderserve.costmodel.comm import SEND_LATENCY_S
from thunderserve.costmodel.kv import kv_seconds_per_token, kv_transfer_time_s
from thunderserve.costmodel.network import Path, Topology, contention_slowdown, kv_paths, max_min_rates
from thunderserve.plan import group_perf_of
from thunderserve.sim import SimConfig, simulate
from thunderserve.sim.kernel import EventLoop
from thunderserve.sim.network import FlowNetwork


def _fan_plan(n: int, prefill: list[str], decode: list[str]):  # type: ignore[no-untyped-def]
    groups = [(f"p{i}", "prefill", [[prefill[i]]], [0, 2]) for i in range(n)]
    groups += [(f"d{i}", "decode", [[decode[i]]], [0, 2]) for i in range(n)]
    return make_plan(groups, entry={f"p{i}": 1.0 / n for i in range(n)}, kv={f"p{i}": {f"d{i}": 1.0}
                                                                            for i in range(n)})


def _transfer_s(plan, cluster, n: int, prompt: int = 400, output: int = 2) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Per request: time between its first token and its KV arriving (finish minus the one decode step)."""
    r = simulate(plan, cluster, MODEL, *requests([0.0] * n, prompt, output), SimConfig(warmup_s=0))
    d_perf = group_perf_of(plan.group("d0"), MODEL, cluster)
    return r.finish_s - r.first_token_s - d_perf.decode_time_s(1, prompt)  # type: ignore[no-any-return]


def _times(n: int, alone_s: float) -> float:
    """n transfers sharing one bottleneck: n times the bytes' time, one message latency."""
    return SEND_LATENCY_S + n * (alone_s - SEND_LATENCY_S)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_n_simultaneous_transfers_out_of_one_node_take_n_times_as_long(n: int) -> None:
    cluster = make_cluster((("a", "TOY", 3), ("b", "TOY", 1), ("c", "TOY", 1), ("d", "TOY", 1)))
    plan = _fan_plan(n, ["a:0", "a:1", "a:2"], ["b:0", "c:0", "d:0"])
    alone = kv_transfer_time_s(400, kv_seconds_per_token(MODEL, [([cluster.by_id["a:0"]], 2)],
                                                         [cluster.by_id["b:0"]], cluster))
    np.testing.assert_allclose(_transfer_s(plan, cluster, n), _times(n, alone), rtol=1e-9)


@pytest.mark.parametrize("n", [1, 3])
def test_n_simultaneous_transfers_into_one_node_take_n_times_as_long(n: int) -> None:
    cluster = make_cluster((("a", "TOY", 1), ("b", "TOY", 1), ("c", "TOY", 1), ("d", "TOY", 3)))
    plan = _fan_plan(n, ["a:0", "b:0", "c:0"], ["d:0", "d:1", "d:2"])
    alone = kv_transfer_time_s(400, kv_seconds_per_token(MODEL, [([cluster.by_id["a:0"]], 2)],
                                                         [cluster.by_id["d:0"]], cluster))
    np.testing.assert_allclose(_transfer_s(plan, cluster, n), _times(n, alone), rtol=1e-9)


def test_transfers_between_disjoint_node_pairs_do_not_slow_each_other() -> None:
    cluster = make_cluster((("a", "TOY", 1), ("b", "TOY", 1), ("c", "TOY", 1), ("d", "TOY", 1)),
                           gpu_types=(TOY_GPU,))
    plan = _fan_plan(2, ["a:0", "b:0"], ["c:0", "d:0"])
    alone = kv_transfer_time_s(400, kv_seconds_per_token(MODEL, [([cluster.by_id["a:0"]], 2)],
                                                         [cluster.by_id["c:0"]], cluster))
    np.testing.assert_allclose(_transfer_s(plan, cluster, 2), alone, rtol=1e-9)


def test_transfers_crossing_one_zone_path_share_it_even_with_fast_nics() -> None:
    # a, b in zone x; c, d in zone y; 100 Gbps NICs, 10 Gbps between the zones: two transfers x -> y halve
    spec_nodes = (("a", "TOY", 1), ("b", "TOY", 1), ("c", "TOY", 1), ("d", "TOY", 1))
    cluster = make_cluster(spec_nodes, default_gbps=10.0)
    zoned = cluster.spec.model_copy(update={"nodes": tuple(
        nd.model_copy(update={"zone": "x" if nd.name in "ab" else "y", "nic_gbps": 100.0})
        for nd in cluster.spec.nodes)})
    from thunderserve.spec.cluster import resolve_cluster

    cluster = resolve_cluster(zoned)
    topo = Topology.of(cluster)
    assert topo.crossed([0], [2]) == ("nic-in:c", "nic-out:a", "zone:x:y")
    plan = _fan_plan(2, ["a:0", "b:0"], ["c:0", "d:0"])
    alone = kv_transfer_time_s(400, kv_seconds_per_token(MODEL, [([cluster.by_id["a:0"]], 2)],
                                                         [cluster.by_id["c:0"]], cluster))
    np.testing.assert_allclose(_transfer_s(plan, cluster, 2), _times(2, alone), rtol=1e-9)


def test_max_min_rates_cap_and_bottleneck() -> None:
    # flow 2 is held to 1 by its cap; flows 0 and 1 split what is left of resource r
    assert max_min_rates([("r",), ("r",), ("r", "s")], [10.0, 10.0, 1.0], {"r": 9.0, "s": 100.0}) \
        == pytest.approx([4.0, 4.0, 1.0])
    assert max_min_rates([(), ("r",)], [10.0, float("inf")], {"r": 4.0}) == pytest.approx([10.0, 4.0])


def test_flow_network_frees_bandwidth_when_a_flow_ends() -> None:
    # two flows of 10 and 30 bytes over a 10 B/s resource: both at 5 B/s until t=2, then the second alone
    loop = EventLoop()
    net = FlowNetwork(loop, {"r": 10.0})
    done: dict[str, float] = {}
    for name, nbytes in (("short", 10.0), ("long", 30.0)):
        net.start(("r",), float("inf"), nbytes, lambda k: done.__setitem__(k, loop.now_s), name)
    loop.run()
    assert done["short"] == pytest.approx(2.0) and done["long"] == pytest.approx(4.0)


def test_pipeline_stages_of_one_node_share_its_nic_when_sending_kv() -> None:
    cluster = make_cluster((("a", "TOY", 2), ("b", "TOY", 2)))
    topo = Topology.of(cluster)
    one = [([cluster.by_id["a:0"]], 2)]
    two = [([cluster.by_id["a:0"]], 1), ([cluster.by_id["a:1"]], 1)]
    paths = kv_paths(MODEL, two, [cluster.by_id["b:0"]], cluster, topo)
    assert [p.resources for p in paths] == [("nic-in:b", "nic-out:a", "zone:a:b")] * 2
    # each stage alone would send its half at full speed; through one NIC the whole takes as long as one stage
    dst = [cluster.by_id["b:0"]]
    assert kv_seconds_per_token(MODEL, two, dst, cluster) == pytest.approx(kv_seconds_per_token(MODEL, one, dst,
                                                                                                cluster))
    plan = make_plan([("p0", "prefill", [["a:0"], ["a:1"]], [0, 1, 2]), ("d0", "decode", [["b:0"]], [0, 2])],
                     entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}})
    expected = kv_transfer_time_s(400, kv_seconds_per_token(MODEL, two, dst, cluster))
    np.testing.assert_allclose(_transfer_s(plan, cluster, 1), expected, rtol=1e-6)


def test_contention_slowdown_grows_with_load_and_saturates() -> None:
    path = [Path(("r",), 1.0, 10.0)]
    cap = {"r": 10.0}
    assert contention_slowdown(path, {}, cap) == 1.0
    assert contention_slowdown(path, {"r": 5.0}, cap) == pytest.approx(2.0)
    assert contention_slowdown(path, {"r": 10.0}, cap) == float("inf")
    assert contention_slowdown([Path(("r",), 1.0, 2.0)], {"r": 5.0}, cap) == 1.0  # its own cap binds first


def test_compressed_kv_pays_quantise_on_prefill_and_dequantise_on_decode() -> None:
    from sim_builders import disagg_plan, two_node_cluster

    from thunderserve.costmodel.kv import codec_seconds_per_token

    cluster = two_node_cluster()
    plan = disagg_plan("int8")
    p_perf = group_perf_of(plan.group("p0"), MODEL, cluster)
    d_perf = group_perf_of(plan.group("d0"), MODEL, cluster)
    a0, b0 = cluster.by_id["a:0"], cluster.by_id["b:0"]
    quant = codec_seconds_per_token(MODEL, [([a0], 2)], "int8")
    dequant = codec_seconds_per_token(MODEL, [([b0], 2)], "int8")
    # one GPU codes the fp16 KV of every layer at its codec throughput
    assert quant == pytest.approx(MODEL.kv_bytes_per_token / a0.spec.codec_bytes_s)
    assert codec_seconds_per_token(MODEL, [([a0], 2)], "none") == 0.0
    spt = kv_seconds_per_token(MODEL, [([a0], 2)], [b0], cluster, "int8")
    r = simulate(plan, cluster, MODEL, *requests([0.0], 200, 3), SimConfig(warmup_s=0))
    ttft = p_perf.prefill_time_s(200, 200**2, 1)
    decode = sum(d_perf.decode_time_s(1, 200 + k) for k in range(2))
    assert r.first_token_s[0] == pytest.approx(ttft, rel=1e-12)  # the first token leaves before quantising
    expected = ttft + 200 * quant + kv_transfer_time_s(200, spt) + 200 * dequant + decode
    assert r.finish_s[0] == pytest.approx(expected, rel=1e-9)


def test_a_pipeline_send_takes_its_share_of_a_busy_nic() -> None:
    # p0 is TP1 x PP2 over nodes a and b; while p1's KV leaves node a, p0's activations share a's NIC
    cluster = make_cluster((("a", "TOY", 2), ("b", "TOY", 1), ("c", "TOY", 1), ("d", "TOY", 1)))
    from thunderserve.sim.replay import _Replay, _Requests

    plan = make_plan([("p0", "prefill", [["a:0"], ["b:0"]], [0, 1, 2]), ("p1", "prefill", [["a:1"]], [0, 2]),
                      ("d0", "decode", [["c:0"]], [0, 2]), ("d1", "decode", [["d:0"]], [0, 2])],
                     entry={"p0": 0.5, "p1": 0.5}, kv={"p0": {"d0": 1.0}, "p1": {"d1": 1.0}})
    arrival, prompt, output = requests([0.0], 100, 2)
    replay = _Replay(plan, cluster, MODEL, _Requests(arrival, prompt, output), SimConfig(warmup_s=0), None, None)
    p0 = replay.by_id["p0"]
    assert p0.pp_send_resources == [("nic-in:b", "nic-out:a", "zone:a:b")]  # type: ignore[union-attr]
    assert replay.net.slowdown(("nic-out:a",), cluster.nic_bytes_s[0]) == 1.0
    replay.net.start(("nic-out:a",), float("inf"), 1e12, lambda _: None, None)
    assert replay.net.slowdown(("nic-out:a",), cluster.nic_bytes_s[0]) == pytest.approx(2.0)
