"""The planner's KV level choice among the levels the gate allows (`SchedulerConfig.kv_alternatives`)."""

from __future__ import annotations

from sched_builders import cluster, context, loose_slo, synthetic_workload

from thunderserve.costmodel.comm import Compression
from thunderserve.plan import Phase
from thunderserve.scheduler.config import SchedulerConfig
from thunderserve.scheduler.finalise import final_plan
from thunderserve.scheduler.planner import _best_level, plan_deployment
from thunderserve.scheduler.tabu import Evaluator, canonical
from thunderserve.spec import load_model

ALL = (Compression.NONE, Compression.INT8, Compression.INT4)


def _rate_at(level: Compression, c, state):  # type: ignore[no-untyped-def]
    ctx = context(c, compression=level)
    return float(final_plan(ctx, Evaluator(ctx), state, None).estimate["max_rate_at_slo"])


def test_kv_crossing_a_slow_link_keeps_the_level_the_estimate_rates_highest() -> None:
    c = cluster((("a", "FAST", 1), ("b", "FAST", 1)), default_gbps=1)
    state = canonical([(frozenset({"a:0"}), Phase.PREFILL), (frozenset({"b:0"}), Phase.DECODE)], c.index_of)
    ctx = context(c, compression=Compression.INT4)
    searched = final_plan(ctx, Evaluator(ctx), state, None)
    chosen = _best_level(ctx, SchedulerConfig(kv_compression=Compression.INT4, kv_alternatives=ALL), searched,
                         state, None)
    rates = {lv: _rate_at(lv, c, state) for lv in ALL}
    assert rates[Compression.INT4] > rates[Compression.NONE]  # 1 Gb/s: compression pays
    assert chosen.kv_transfer.compression != Compression.NONE
    assert float(chosen.estimate["max_rate_at_slo"]) >= max(rates.values()) * (1 - 1e-4)


def test_no_kv_on_links_ends_with_the_exact_cache() -> None:
    # colocated groups move no KV: every level ties and the planner keeps the uncompressed cache
    c = cluster((("a", "FAST", 1), ("b", "SLOW", 1)))
    cfg = SchedulerConfig(max_evaluations=10, kv_compression=Compression.INT4, kv_alternatives=ALL,
                          phases=(Phase.COLOCATED,))
    result = plan_deployment(c, load_model("llama-2-7b"), synthetic_workload(), loose_slo(), cfg)
    assert result.plan.kv_transfer.compression == Compression.NONE
    without = plan_deployment(c, load_model("llama-2-7b"), synthetic_workload(), loose_slo(),
                              SchedulerConfig(max_evaluations=10, kv_compression=Compression.INT4,
                                              phases=(Phase.COLOCATED,)))
    assert without.plan.kv_transfer.compression == Compression.INT4  # no alternatives: the searched level
    assert [g.stages for g in result.plan.groups] == [g.stages for g in without.plan.groups]
