"""Routing LP: shares sum to 1, capacities respected, unusable (zero-bandwidth) links carry nothing."""

from __future__ import annotations

import pytest
from sched_builders import cluster, context, loose_slo, synthetic_workload

from thunderserve.errors import PlanError
from thunderserve.plan import Group, Phase, Plan, Stage, validate_plan
from thunderserve.scheduler import solve_routing
from thunderserve.scheduler.routing_lp import route
from thunderserve.spec import load_model

LLAMA7 = load_model("llama-2-7b")
L = LLAMA7.num_layers


def group(gid: str, phase: str, *gpus: str) -> Group:
    return Group(id=gid, phase=Phase(phase), stages=(Stage(gpus=tuple(gpus), layers=(0, L)),))


def test_shares_sum_to_one_and_capacities_hold() -> None:
    c = cluster((("a", "FAST", 2), ("b", "SLOW", 2), ("c", "TOY", 2)), default_gbps=25)
    ctx = context(c)
    groups = [group("p0", "prefill", "a:0"), group("p1", "prefill", "a:1"), group("d0", "decode", "b:0", "b:1"),
              group("d1", "decode", "c:0"), group("c0", "colocated", "c:1")]
    lp = route(ctx, groups)
    assert lp.slo_feasible and lp.value_rps > 0
    routing = lp.routing()
    assert sum(routing.entry.values()) == pytest.approx(1.0, abs=1e-12)
    for dests in routing.kv.values():
        assert sum(dests.values()) == pytest.approx(1.0, abs=1e-12)
    by_id = {g.id: g for g in groups}
    # prefill time-sharing and decode time-sharing rows, colocated bounds, with the capacities the LP used
    for p, dests in lp.kv_rps.items():
        assert sum(f / lp.prefill_caps[(p, d)] for d, f in dests.items()) <= 1 + 1e-6
    for d in ("d0", "d1"):
        used = sum(dests[d] / lp.decode_caps[(p, d)] for p, dests in lp.kv_rps.items() if d in dests)
        assert used <= 1 + 1e-6
    assert lp.entry_rps.get("c0", 0.0) <= lp.colocated_caps["c0"] * (1 + 1e-6)
    # those capacities are the context's, for Poisson (c² = 1) or smoother round-robin arrivals
    for (p, d), cap in lp.prefill_caps.items():
        spt = ctx.seconds_per_token(by_id[p].stages, by_id[d].stages)
        assert cap in {ctx.prefill_capacity(by_id[p].stages, spt, 2.0 ** -k) for k in range(7)}
    assert ctx.colocated_capacity(by_id["c0"].stages, 0.25) >= ctx.colocated_capacity(by_id["c0"].stages)
    # the LP saturates something: the served rate is the sum of the flows
    assert lp.value_rps == pytest.approx(sum(lp.entry_rps.values()))


def test_zero_bandwidth_link_is_never_used() -> None:
    c = cluster((("a", "FAST", 1), ("b", "TOY", 1), ("c", "TOY", 1)), default_gbps=25,
                links=[{"between": ["a", "c"], "gbps": 0}])
    plan = Plan(model=LLAMA7.name, cluster=c.name, groups=(group("p0", "prefill", "a:0"),
                                                           group("d0", "decode", "b:0"),
                                                           group("d1", "decode", "c:0")))
    routing = solve_routing(plan, c, LLAMA7, synthetic_workload(), loose_slo())
    assert routing.kv["p0"] == {"d0": 1.0}
    validate_plan(plan.model_copy(update={"routing": routing}), c, LLAMA7)


def test_faster_link_preferred_when_capacity_allows() -> None:
    # two equal decode groups, one behind a slow link: the fast one takes at least as much KV
    c = cluster((("a", "FAST", 1), ("b", "TOY", 1), ("c", "TOY", 1)), default_gbps=40,
                links=[{"between": ["a", "c"], "gbps": 2}])
    groups = [group("p0", "prefill", "a:0"), group("d0", "decode", "b:0"), group("d1", "decode", "c:0")]
    lp = route(context(c), groups)
    kv = lp.kv_rps["p0"]
    assert kv.get("d0", 0.0) >= kv.get("d1", 0.0)


def test_prefill_without_reachable_decode_cannot_route() -> None:
    c = cluster((("a", "FAST", 1), ("b", "TOY", 1)), default_gbps=25, links=[{"between": ["a", "b"], "gbps": 0}])
    with pytest.raises(PlanError, match="no group can serve requests"):
        route(context(c), [group("p0", "prefill", "a:0"), group("d0", "decode", "b:0")])


def test_colocated_only_routes_by_capacity() -> None:
    c = cluster((("a", "FAST", 1), ("b", "SLOW", 1)))
    lp = route(context(c), [group("c0", "colocated", "a:0"), group("c1", "colocated", "b:0")])
    r = lp.routing()
    assert r.kv == {}
    assert r.entry["c0"] > r.entry["c1"] > 0
