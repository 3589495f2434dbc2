"""The changing-deployment replay: identical to `simulate` without changes; failures, flips, loads and restarts
keep "every request finishes exactly once" and cost what they should."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sim_builders import constant_workload, two_node_cluster

from builders import make_model, make_plan
from thunderserve.plan import Routing
from thunderserve.sim import SimConfig, simulate
from thunderserve.sim.dynamic import DECODE, ENTRY, DynamicReplay, GroupState, _DynColocated, _DynDecode
from thunderserve.sim.kernel import PRIORITY_DECIDE
from thunderserve.sim.replay import _Requests

CLUSTER = two_node_cluster()
CFG = SimConfig(warmup_s=0)
# Heavy enough that groups hold work when something happens (a decode step ~3 ms on the toy GPU).
MODEL = make_model(num_layers=8, hidden_size=4096, num_heads=32, num_kv_heads=32,
                   intermediate_size=11008)
L = [0, 8]


def mixed_plan(c0_phase: str = "colocated"):  # type: ignore[no-untyped-def]
    """p0 (prefill, a:0) -> d0 (decode, b:0) and d1 (decode, b:1); c0 (a:1) serves alone."""
    kv = {"p0": {"d0": 0.5, "d1": 0.5}}
    return make_plan([("p0", "prefill", [["a:0"]], L), ("d0", "decode", [["b:0"]], L),
                      ("d1", "decode", [["b:1"]], L), ("c0", c0_phase, [["a:1"]], L)],
                     entry={"p0": 0.5, "c0": 0.5}, kv=kv)


def stream(n: int = 400, rate: float = 40.0, prompt: int = 300, output: int = 200, seed: int = 1
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    wl = constant_workload(prompt, output)
    t, p, o = wl.poisson_requests(rate, n / rate, seed=seed)
    return t, p, o


def replay_of(plan, reqs):  # type: ignore[no-untyped-def]
    rep = DynamicReplay(CLUSTER, MODEL, _Requests(*reqs), CFG)
    rep.install(plan)
    rep.start()
    return rep


def at(rep: DynamicReplay, t: float, fn) -> None:  # type: ignore[no-untyped-def]
    rep.loop.schedule(t, PRIORITY_DECIDE, lambda _: fn(), None)


def test_without_changes_it_is_the_fixed_replay_bit_for_bit() -> None:
    plan = mixed_plan()
    reqs = stream()
    rep = replay_of(plan, reqs)
    rep.loop.run()
    fixed = simulate(plan, CLUSTER, MODEL, *reqs, CFG)
    assert np.array_equal(np.asarray(rep.req.first), fixed.first_token_s)
    assert np.array_equal(np.asarray(rep.req.finish), fixed.finish_s)
    assert rep.finished == len(reqs[0]) and sum(rep.retries) == 0


def test_a_failed_decode_group_loses_its_kv_and_the_requests_are_retried_once_each() -> None:
    reqs = stream()
    rep = replay_of(mixed_plan(), reqs)
    at(rep, 4.0, lambda: rep.fail_gpus({"b:1"}))
    swept: list[tuple[int, int]] = []
    at(rep, 7.0, lambda: swept.append(rep.sweep({"b:1"})))
    rep.loop.run()
    n = len(reqs[0])
    finish = np.asarray(rep.req.finish)
    assert rep.finished == n and not np.isnan(finish).any()  # every request finished exactly once
    lost, moved = swept[0]
    assert lost > 0 and moved >= 0 and sum(rep.retries) == lost
    assert "d1" not in rep.objects and rep.kv_ok == {"d0"}
    # Nothing finished on the dead group after it stopped: requests routed to d1 either finished before 4 s
    # or were retried.
    first = np.asarray(rep.req.first)
    assert np.all(first >= np.asarray(rep.req.arrival))


def test_requests_sent_to_a_dead_group_before_detection_start_over_at_detection() -> None:
    reqs = stream()
    rep = replay_of(mixed_plan(), reqs)
    at(rep, 4.0, lambda: rep.fail_gpus({"a:1"}))  # c0, an entry group
    at(rep, 7.0, lambda: rep.sweep({"a:1"}))
    rep.loop.run()
    arrival = np.asarray(rep.req.arrival)
    first = np.asarray(rep.req.first)
    retried = np.asarray(rep.retries) > 0
    undetected = retried & (arrival > 4.0) & (arrival < 7.0)  # sent to c0 after it died, before detection
    assert undetected.sum() > 10
    assert np.all(first[undetected] >= 7.0)  # they waited for the router to notice
    assert rep.finished == len(arrival)


def test_a_flip_from_colocated_to_decode_hands_the_running_batch_over() -> None:
    reqs = stream(rate=30.0)
    rep = replay_of(mixed_plan(), reqs)
    new_plan = mixed_plan("decode").model_copy(update={"routing": Routing(
        entry={"p0": 1.0}, kv={"p0": {"d0": 0.4, "d1": 0.3, "c0": 0.3}})})

    def flip() -> None:
        rep.flip(new_plan.group("c0"), drain_s=2.0)
        rep.set_routing(new_plan)

    at(rep, 5.0, flip)
    states: list[tuple[str, str, float]] = []
    rep.on_state = lambda gid, state, now: states.append((gid, state, now))
    rep.loop.run()
    assert rep.finished == len(reqs[0]) and sum(rep.retries) == 0  # nothing lost in a flip
    obj = rep.objects["c0"]
    assert isinstance(obj, _DynDecode) and obj.state is GroupState.ACTIVE
    ready = [t for gid, s, t in states if gid == "c0" and s == "active"]
    gone = [t for gid, s, t in states if gid == "c0" and s == "gone"]
    assert ready and ready[0] >= 7.0 and gone and gone[0] == ready[0]  # handed over at a step boundary
    entry = np.asarray(rep.req.entry)
    arrival = np.asarray(rep.req.arrival)
    assert not np.any((entry == 3) & (arrival > 5.0))  # no new prompts for the old colocated role


def test_a_restart_serves_nothing_during_the_downtime_and_retries_in_flight_work() -> None:
    plan = make_plan([("c0", "colocated", [["a:0"]], L), ("c1", "colocated", [["b:0"]], L)],
                     entry={"c0": 0.5, "c1": 0.5})
    reqs = stream(rate=30.0)
    rep = replay_of(plan, reqs)
    lost: list[int] = []

    def restart() -> None:
        lost.append(rep.stop_all())
        rep.install(plan, ready_at_s=10.0 + 5.0)

    at(rep, 10.0, restart)
    rep.loop.run()
    first = np.asarray(rep.req.first)
    finish = np.asarray(rep.req.finish)
    assert rep.finished == len(first) and lost[0] > 0 and sum(rep.retries) == lost[0]
    assert not np.any((finish > 10.0) & (finish < 15.0))
    assert not np.any((first > 10.0) & (first < 15.0))


def test_a_loading_group_keeps_its_share_and_serves_it_once_loaded() -> None:
    one = make_plan([("c0", "colocated", [["a:0"]], L)], entry={"c0": 1.0})
    two = make_plan([("c0", "colocated", [["a:0"]], L), ("c1", "colocated", [["b:0"]], L)],
                    entry={"c0": 0.5, "c1": 0.5})
    reqs = stream(rate=20.0)
    rep = replay_of(one, reqs)

    def grow() -> None:
        rep.load(two.group("c1"), load_s=6.0)
        rep.set_routing(two)

    at(rep, 5.0, grow)
    rep.loop.run()
    entry = np.asarray(rep.req.entry)
    first = np.asarray(rep.req.first)
    to_c1 = entry == rep.objects["c1"].idx
    assert to_c1.any() and np.all(first[to_c1] >= 11.0)  # queued there until loaded
    assert isinstance(rep.objects["c1"], _DynColocated) and rep.finished == len(first)


def test_with_no_group_left_requests_wait_and_stay_unfinished() -> None:
    plan = make_plan([("c0", "colocated", [["a:0"]], L)], entry={"c0": 1.0})
    reqs = stream(n=100, rate=20.0)
    rep = replay_of(plan, reqs)
    at(rep, 2.0, lambda: rep.fail_gpus({"a:0"}))
    at(rep, 3.0, lambda: rep.sweep({"a:0"}))
    rep.loop.run()
    finish = np.asarray(rep.req.finish)
    assert np.isnan(finish).sum() == len(rep.held) > 0
    assert rep.finished + len(rep.held) == len(finish)
    assert all(math.isnan(finish[r]) for r in rep.held)


def test_ideal_links_are_refused() -> None:
    with pytest.raises(ValueError, match="ideal_kv_links"):
        DynamicReplay(CLUSTER, MODEL, _Requests(*stream(n=5)), SimConfig(ideal_kv_links=True))


def test_progress_counts_the_tokens_each_unfinished_request_produced_so_far() -> None:
    reqs = stream(rate=30.0)
    rep = replay_of(mixed_plan(), reqs)
    snaps: list[tuple[dict[int, int], dict[int, int]]] = []

    def snap() -> None:
        prog = rep.progress()
        on = {r: (rep.dst_obj[r] or rep.holder[r]).idx for r in prog  # type: ignore[union-attr]
              if rep.stage[r] in (DECODE, ENTRY)}  # in a decode group, or in the colocated group it entered
        snaps.append((prog, on))

    at(rep, 3.0, snap)
    at(rep, 3.5, snap)
    rep.loop.run()
    output = rep.req.output
    (p1, g1), (p2, _) = snaps
    assert p1 and p2
    for prog in (p1, p2):
        # the first token counts; a request still in progress has at least one token to go
        assert all(1 <= k <= output[r] - 1 for r, k in prog.items())
        assert all(not math.isnan(rep.req.first[r]) for r in prog)
    both = [r for r in p1 if r in p2]
    assert both and all(p2[r] >= p1[r] for r in both)
    # sequences batched together advance together: one token per decode step of their group
    by_group: dict[int, set[int]] = {}
    for r in both:
        if r in g1 and p1[r] > 1:
            by_group.setdefault(g1[r], set()).add(p2[r] - p1[r])
    assert by_group and all(len(steps) == 1 and min(steps) > 0 for steps in by_group.values())


def test_rebalance_hands_a_backlog_out_again_by_the_new_shares() -> None:
    lopsided = make_plan([("c0", "colocated", [["a:0"]], L), ("c1", "colocated", [["a:1"]], L)],
                         entry={"c0": 1.0})
    even = make_plan([("c0", "colocated", [["a:0"]], L), ("c1", "colocated", [["a:1"]], L)],
                     entry={"c0": 0.5, "c1": 0.5})
    reqs = stream(n=600, rate=60.0)
    rep = replay_of(lopsided, reqs)
    seen: list[tuple[int, int, int]] = []

    def reroute() -> None:
        c0 = rep.objects["c0"]
        assert isinstance(c0, _DynColocated)
        before = len(c0.waiting)
        rep.set_routing(even)
        moved = rep.rebalance()
        seen.append((before, moved, len(c0.waiting)))

    at(rep, 3.0, reroute)
    rep.loop.run()
    before, moved, after = seen[0]
    assert before > 20 and moved == before  # c0's whole unstarted backlog went back to the router
    assert abs(after - moved / 2) <= 2  # and half of it came back by the even shares
    entry = np.asarray(rep.req.entry)
    assert (entry == rep.objects["c1"].idx).sum() > 0
    assert rep.finished == len(reqs[0]) and sum(rep.retries) == 0
