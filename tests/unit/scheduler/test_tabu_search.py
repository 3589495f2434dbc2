"""Tabu moves keep a partition, tabu memory and aspiration work, and the search matches exhaustive enumeration."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from sched_builders import cluster, context

from thunderserve.costmodel.comm import Compression
from thunderserve.plan import Group, Phase
from thunderserve.scheduler import SchedulerConfig, plan_deployment
from thunderserve.scheduler.context import PlanningContext
from thunderserve.scheduler.finalise import replica_candidates
from thunderserve.scheduler.initial import typed_node_runs
from thunderserve.scheduler.orchestrate import choose_phases
from thunderserve.scheduler.tabu import MOVE_WEIGHTS, Evaluator, MoveSampler, Score, canonical, tabu_search
from thunderserve.spec import SloSpec, load_cluster, load_model, load_workload

ALL = (Phase.PREFILL, Phase.DECODE, Phase.COLOCATED)


def _state(ctx, groups):  # type: ignore[no-untyped-def]
    return canonical([(frozenset(g), ph) for g, ph in groups], ctx.cluster.index_of)


def test_every_move_kind_keeps_a_partition_of_the_gpus() -> None:
    c = cluster((("a", "TOY", 2), ("b", "SLOW", 2), ("c", "FAST", 2)))
    ctx = context(c)
    sampler = MoveSampler(ctx, SchedulerConfig(seed=3))
    state = _state(ctx, [(["a:0", "a:1"], Phase.PREFILL), (["b:0", "b:1", "c:0"], Phase.DECODE),
                         (["c:1"], Phase.COLOCATED)])
    seen_kinds = set()
    all_gpus = sorted(g.id for g in c.gpus)
    for _ in range(400):
        move = sampler.sample(state)
        if move is None:
            continue
        seen_kinds.add(move.kind)
        gpus = sorted(g for key, _ in move.state for g in key)
        assert gpus == all_gpus  # every GPU exactly once
        assert all(key for key, _ in move.state)
        assert move.touches  # every move names what it changes, for the tabu list
        state = move.state if move.kind != "merge" or len(move.state) > 1 else state
    assert seen_kinds == set(MOVE_WEIGHTS)


def test_sampler_is_deterministic_for_a_seed() -> None:
    c = cluster((("a", "TOY", 2), ("b", "SLOW", 2)))
    ctx = context(c)
    state = _state(ctx, [(["a:0", "a:1"], Phase.PREFILL), (["b:0", "b:1"], Phase.DECODE)])
    runs = []
    for _ in range(2):
        sampler = MoveSampler(ctx, SchedulerConfig(seed=11))
        runs.append([(m.kind, m.state) if m else None for m in (sampler.sample(state) for _ in range(50))])
    assert runs[0] == runs[1]


def test_score_order_value_then_cost_then_tidiness() -> None:
    assert Score(10.0, 5.0).better_than(Score(9.0, 1.0))
    assert Score(10.0, 4.0).better_than(Score(10.0, 5.0))
    assert Score(10.0, 5.0, spread=0).better_than(Score(10.0, 5.0, spread=2))
    assert not Score(10.0, 5.0).better_than(Score(10.0, 5.0))


def test_tabu_blocks_reversal_but_aspiration_allows_a_new_best() -> None:
    c = cluster((("a", "TOY", 1), ("b", "TOY", 1), ("c", "SLOW", 1)))
    ctx = context(c)
    start = _state(ctx, [(["a:0"], Phase.PREFILL), (["b:0"], Phase.PREFILL), (["c:0"], Phase.PREFILL)])
    # a start with prefill only serves nothing; the search must find a serving plan (aspiration never blocks
    # a new best, so the first improving moves are always taken)
    result = tabu_search(ctx, start, SchedulerConfig(max_iterations=40, patience=40, tabu_tenure=50, seed=1),
                         deadline=time.monotonic() + 60)
    assert result.score.value_rps > 0
    assert result.history == tuple(sorted(result.history))  # best-so-far never decreases


def set_partitions(items: list[str]) -> Iterator[list[list[str]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]
        yield [[first], *part]


def exhaustive_best(ctx, phases=ALL) -> float:  # type: ignore[no-untyped-def]
    ev = Evaluator(ctx)
    best = 0.0
    gpus = sorted(g.id for g in ctx.cluster.gpus)
    for part in set_partitions(gpus):
        for combo in itertools.product(phases, repeat=len(part)):
            state = _state(ctx, list(zip(part, combo, strict=True)))
            best = max(best, ev.evaluate(state)[0].value_rps)
    return best


@pytest.mark.parametrize("nodes,model", [
    ((("a", "FAST", 2), ("b", "SLOW", 2), ("c", "TOY", 1)), "llama-2-7b"),
    ((("a", "TOY", 2), ("b", "SLOW", 1), ("c", "FAST", 2)), "llama-2-13b"),
])
def test_tabu_matches_exhaustive_enumeration_within_2_percent(nodes, model) -> None:  # type: ignore[no-untyped-def]
    c = cluster(nodes, default_gbps=25)
    ctx = context(c, model)
    best = exhaustive_best(ctx)
    assert best > 0
    result = plan_deployment(c, ctx.model, ctx.workload, ctx.slo,
                             SchedulerConfig(max_evaluations=100_000, max_iterations=300, patience=80, seed=0))
    assert result.plan.estimate["lp_rate_rps"] >= 0.98 * best
    # and from the worst start (every GPU alone, all prefill: serves nothing), the search alone gets there
    worst = _state(ctx, [([g.id], Phase.PREFILL) for g in c.gpus])
    found = tabu_search(ctx, worst, SchedulerConfig(max_evaluations=100_000, max_iterations=400,
                                                         patience=150, seed=0))
    assert found.score.value_rps >= 0.98 * best


@pytest.mark.slow
def test_tabu_matches_exhaustive_enumeration_on_six_gpus() -> None:
    c = cluster((("a", "FAST", 2), ("b", "SLOW", 2), ("c", "TOY", 2)), default_gbps=25)
    ctx = context(c, "llama-2-13b")
    best = exhaustive_best(ctx)
    result = plan_deployment(c, ctx.model, ctx.workload, ctx.slo,
                             SchedulerConfig(max_evaluations=100_000, max_iterations=500, patience=150, seed=0))
    assert result.plan.estimate["lp_rate_rps"] >= 0.98 * best


def test_random_module_not_used_globally() -> None:
    # the sampler owns its Random: global random state does not change plans
    c = cluster((("a", "TOY", 2), ("b", "SLOW", 2)))
    ctx = context(c)
    random.seed(123)
    a = MoveSampler(ctx, SchedulerConfig(seed=5)).rng.random()
    random.seed(999)
    b = MoveSampler(ctx, SchedulerConfig(seed=5)).rng.random()
    assert a == b


def test_verify_top_rescores_distinct_candidates_and_keeps_the_best_rescored() -> None:
    c = cluster((("a", "TOY", 2), ("b", "SLOW", 2), ("c", "FAST", 2)), default_gbps=25)
    ctx = context(c)
    config = SchedulerConfig(max_evaluations=100_000, max_iterations=60, patience=30, seed=0)
    plain = plan_deployment(c, ctx.model, ctx.workload, ctx.slo, config)
    seen: list[list] = []

    def prefer_last(plans):  # type: ignore[no-untyped-def]
        """A rescorer that disagrees with the estimate: the last candidate is best."""
        seen.append(plans)
        return [float(i) for i in range(len(plans))]

    verified = plan_deployment(c, ctx.model, ctx.workload, ctx.slo, replace(config, verify_top=4),
                               rescore=prefer_last)
    (plans,) = seen
    assert plans[0].to_dict() == plain.plan.to_dict()  # the search's best comes first
    replicas = replica_candidates(PlanningContext(c, ctx.model, ctx.workload, ctx.slo, config.kv_compression), None)
    signature = [sorted((g.phase.value, tuple(s.gpus for s in g.stages)) for g in p.groups) for p in plans]
    searched = [p for p in plans if p.to_dict() not in [r.to_dict() for r in replicas]]
    assert 2 <= len(searched) <= 4 and len(plans) <= len(searched) + len(replicas)
    assert all(signature.count(x) == 1 for x in signature)  # no plan twice
    shapes = [tuple(sorted((g.phase.value, g.pp, g.stages[0].tp) for g in p.groups)) for p in searched]
    assert len(set(shapes)) == len(shapes)  # distinct parallel shapes first (this space has plenty)
    # the replica layouts: single-stage colocated TP-t groups inside one node, one plan per t
    assert replicas and all(g.phase is Phase.COLOCATED and g.pp == 1 and len({x.split(":")[0] for x in g.gpus}) == 1
                            for r in replicas for g in r.groups)
    assert verified.plan.groups == plans[-1].groups and verified.plan.estimate["verified_max_rate_rps"] == len(plans) - 1
    assert [v for _, v in verified.verified] == [float(i) for i in range(len(plans))]
    assert [e for e, _ in verified.verified][0] == plain.max_rate_at_slo
    with pytest.raises(ValueError, match="rescore"):
        plan_deployment(c, ctx.model, ctx.workload, ctx.slo, replace(config, verify_top=2))


def test_search_is_bounded_by_its_evaluation_budget_and_reproducible() -> None:
    """The default stopping rule is work, not time: the same seed and budget give the same plan, and the
    search scores no more states than its budget (plus the starting solutions)."""
    c = cluster((("a", "TOY", 2), ("b", "SLOW", 2), ("c", "FAST", 2)), default_gbps=25)
    ctx = context(c)
    cfg = SchedulerConfig(max_evaluations=40, seed=3)
    a = plan_deployment(c, ctx.model, ctx.workload, ctx.slo, cfg)
    b = plan_deployment(c, ctx.model, ctx.workload, ctx.slo, cfg)
    assert a.stopped_by == "budget"
    assert a.plan.to_dict() == b.plan.to_dict()
    assert a.iterations == b.iterations and a.evaluations == b.evaluations
    assert 40 <= a.evaluations <= 40 + 3 + 16  # budget, starting solutions, at most one sampled move past it



def test_the_start_is_no_worse_than_any_per_type_run_of_whole_nodes() -> None:
    """A vLLM user's standard layouts (each GPU type's nodes as k-node pipelines, the same k for all types)
    are scored as starts: the search's start is at least as good as each of them (paper-cloud-32, llama-30b,
    conversation at TPOT 100 ms, where the bandwidth-aware start alone split the L40S pair that one
    TP2 x PP4 pipeline serves better)."""
    c, model = load_cluster("paper-cloud-32"), load_model("llama-30b")
    workload, slo = load_workload("conversation"), SloSpec(ttft_ms=1943.0, tpot_ms=100.0, attainment_target=0.9)
    config = SchedulerConfig(max_evaluations=1, kv_compression=Compression.INT4)
    result = plan_deployment(c, model, workload, slo, config=config)
    ctx = PlanningContext(c, model, workload, slo, Compression.INT4, config.max_pp)
    ev = Evaluator(ctx)
    for k in (1, 2):
        keys = typed_node_runs(ctx, {t: k for t in c.gpu_types()})
        assert len(keys) == len(c.node_names) // k
        layouts = [ctx.layout(key, Phase.COLOCATED) for key in keys]
        phased = choose_phases(ctx, [Group(id=f"g{i}", phase=Phase.COLOCATED, stages=lay.stages)
                                     for i, lay in enumerate(layouts) if lay is not None])
        state = canonical([(frozenset(g.gpus), g.phase) for g in phased], c.index_of)
        assert result.start_objective >= ev.evaluate(state)[0].value_rps * (1 - 1e-4)
