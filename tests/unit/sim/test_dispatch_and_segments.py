"""Load-aware dispatch (least outstanding requests) and per-segment KV transfer in the simulator."""

from __future__ import annotations

import numpy as np
import pytest
from sim_builders import MODEL, requests, two_node_cluster

from builders import make_cluster, make_plan
from thunderserve.costmodel.kv import kv_seconds_per_token
from thunderserve.policy.routing import Dispatch, LeastOutstandingChooser
from thunderserve.sim import SimConfig, simulate

CLUSTER = two_node_cluster()


def test_least_outstanding_picks_the_least_loaded_per_share_and_breaks_ties_by_id() -> None:
    lor = LeastOutstandingChooser({"b": 1.0, "a": 1.0})
    assert lor.choose() == "a"  # tie: first in id order
    lor.started("a")
    assert lor.choose() == "b"
    lor.started("b")
    lor.started("b")
    assert lor.choose() == "a"
    lor.released("b")
    lor.released("b")
    assert lor.choose() == "b"
    weighted = LeastOutstandingChooser({"a": 3.0, "b": 1.0})  # weighted least_conn: a takes 3 per b's 1
    picks = []
    for _ in range(8):
        t = weighted.choose()
        weighted.started(t)
        picks.append(t)
    assert picks.count("a") == 6 and picks.count("b") == 2
    with pytest.raises(ValueError):
        LeastOutstandingChooser({"a": 1.0}).released("a")


def test_load_aware_dispatch_sends_a_request_to_the_idle_replica() -> None:
    """Two equal replicas, one busy with a long request: weighted round-robin alternates blindly and queues the
    third request behind the long one; least-outstanding sends it to the replica that is free."""
    plan = make_plan([("c0", "colocated", [["a:0"]], [0, 2]), ("c1", "colocated", [["a:1"]], [0, 2])],
                     entry={"c0": 0.5, "c1": 0.5})
    arrivals = np.asarray([0.0, 0.001, 0.01])  # r0 runs until ~0.03 s, r1 ends at ~0.0012 s
    prompts = np.asarray([100, 100, 100])
    outputs = np.asarray([400, 2, 2])  # r0 is long; r1 finishes at once
    wrr = simulate(plan, CLUSTER, MODEL, arrivals, prompts, outputs, SimConfig(warmup_s=0))
    lor = simulate(plan, CLUSTER, MODEL, arrivals, prompts, outputs,
                   SimConfig(warmup_s=0, dispatch=Dispatch.LEAST_OUTSTANDING))
    assert list(wrr.entry_group) == [0, 1, 0]  # round-robin: r2 joins the long request's replica
    assert list(lor.entry_group) == [0, 1, 1]  # least outstanding: r1 is done, so c1 is empty
    assert lor.finish_s[2] < wrr.finish_s[2]  # alone on its replica it decodes at batch 1


def test_load_aware_dispatch_finishes_every_request_in_a_disaggregated_plan() -> None:
    plan = make_plan([("p0", "prefill", [["a:0"]], [0, 2]), ("d0", "decode", [["b:0"]], [0, 2]),
                      ("d1", "decode", [["b:1"]], [0, 2])], entry={"p0": 1.0}, kv={"p0": {"d0": 0.5, "d1": 0.5}})
    r = simulate(plan, CLUSTER, MODEL, *requests([0.0, 0.0, 0.0, 0.0], 50, 6),
                 SimConfig(warmup_s=0, dispatch=Dispatch.LEAST_OUTSTANDING))
    assert np.all(np.isfinite(r.finish_s))
    assert sorted(r.decode_group.tolist()) == [1, 1, 2, 2]  # KV caches spread by load


def test_kv_of_a_layer_goes_only_to_the_decode_stage_holding_it() -> None:
    """A pipeline whose prefill and decode segments of the same layers share a node (DistServe's low-affinity
    placement) moves its KV inside each node, not over the slow link between nodes."""
    c = make_cluster((("a", "TOY", 2), ("b", "TOY", 2)), default_gbps=1.0)
    by = c.by_id
    prefill = [([by["a:0"]], 1), ([by["b:0"]], 1)]
    decode = [([by["a:1"]], 1), ([by["b:1"]], 1)]
    whole = kv_seconds_per_token(MODEL, prefill, [by["a:1"], by["b:1"]], c)
    segmented = kv_seconds_per_token(MODEL, prefill, [], c, decode_stages=decode)
    intra = c.min_bandwidth_bytes_s([by["a:0"]], [by["a:1"]])
    assert segmented == pytest.approx(MODEL.kv_bytes_per_token_per_layer / intra)
    assert segmented < whole / 10  # the node's own links, not the 1 Gbps one
    # a single decode stage holding every layer gives the whole-group rule
    one = kv_seconds_per_token(MODEL, prefill, [by["b:1"]], c, decode_stages=[([by["b:1"]], 2)])
    assert one == pytest.approx(kv_seconds_per_token(MODEL, prefill, [by["b:1"]], c))
