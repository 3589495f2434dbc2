"""Routing LP: shares sum to 1, capacities respected, unusable (zero-bandwidth) links carry nothing."""

from __future__ import annotations

import math

import pytest
from sched_builders import cluster, context, loose_slo, synthetic_workload

from thunderserve.errors import PlanError
from thunderserve.plan import Group, Phase, Plan, Stage, validate_plan
from thunderserve.scheduler import solve_routing
from thunderserve.scheduler.routing_lp import BASE_LEVEL, attainment_levels, route
from thunderserve.spec import SloSpec, load_model

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
    # every row of the LP holds with the capacities it used: prefill and decode time-sharing over links and
    # attainment levels, colocated time-sharing over levels, and the SLO's attainment over all requests
    for p in ("p0", "p1"):
        used = sum(f / lp.prefill_caps[pp, d, lv] for (pp, d, lv), f in lp.kv_level_rps.items() if pp == p)
        assert used <= 1 + 1e-6
    for d in ("d0", "d1"):
        used = sum(f / lp.decode_caps[p, dd, lv] for (p, dd, lv), f in lp.kv_level_rps.items() if dd == d)
        assert used <= 1 + 1e-6
    assert sum(f / lp.colocated_caps[c, lv] for (c, lv), f in lp.colocated_level_rps.items()) <= 1 + 1e-6
    flows = [(f, lp.levels[lv]) for (_, _, lv), f in lp.kv_level_rps.items()]
    flows += [(f, lp.levels[lv]) for (_, lv), f in lp.colocated_level_rps.items()]
    served = sum(f for f, _ in flows)
    assert sum(f * (1 - a) for f, a in flows) <= (1 - ctx.slo.attainment_target) * served + 1e-9
    assert served == pytest.approx(lp.value_rps)
    # those capacities are the context's, for Poisson (c² = 1) or smoother round-robin arrivals, a pair
    # meeting level a with sqrt(a) on each side; levels below the target only where the target is out of reach
    for (p, d, lv), cap in lp.prefill_caps.items():
        spt = ctx.seconds_per_token(by_id[p].stages, by_id[d].stages)
        side = math.sqrt(lp.levels[lv])
        held = lv > BASE_LEVEL and min(lp.prefill_caps[p, d, BASE_LEVEL], lp.decode_caps[p, d, BASE_LEVEL]) > 0
        assert cap == 0 if held else cap in {ctx.prefill_capacity(by_id[p].stages, spt, 2.0 ** -k, side)
                                             for k in range(7)}
    assert ctx.colocated_capacity(by_id["c0"].stages, 0.25) >= ctx.colocated_capacity(by_id["c0"].stages)
    # the LP saturates something: the served rate is the sum of the flows
    assert lp.value_rps == pytest.approx(sum(lp.entry_rps.values()))


def test_attainment_is_pooled_over_groups() -> None:
    # the SLO counts all requests, not each group's: a group that cannot reach the target at any rate (here
    # TTFT-bound: its longer prompts alone miss 300 ms) still serves, on the misses a fast group run below its
    # capacity (attainment above the target) leaves; a group that can reach the target is held to it
    c = cluster((("a", "FAST", 1), ("b", "SLOW", 1)))
    ctx = context(c)
    ctx.slo = SloSpec(ttft_ms=300.0, tpot_ms=150.0, attainment_target=0.9)
    target = ctx.slo.attainment_target
    levels = attainment_levels(target)
    assert levels[BASE_LEVEL] == pytest.approx(target) and levels == tuple(sorted(levels, reverse=True))
    lp = route(ctx, [group("c0", "colocated", "a:0"), group("c1", "colocated", "b:0")])
    assert lp.colocated_caps["c1", BASE_LEVEL] == 0 < lp.colocated_caps["c0", BASE_LEVEL]
    served = {g: sum(f for (gg, _), f in lp.colocated_level_rps.items() if gg == g) for g in ("c0", "c1")}
    assert served["c1"] > 0
    assert lp.value_rps > lp.colocated_caps["c0", BASE_LEVEL] * 1.01  # more than c0 alone at the target
    assert all(lp.levels[lv] >= target for (g, lv) in lp.colocated_level_rps if g == "c0")  # held to it
    misses = sum(f * (1 - lp.levels[lv]) for (_, lv), f in lp.colocated_level_rps.items())
    assert misses <= (1 - target) * lp.value_rps + 1e-9


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
