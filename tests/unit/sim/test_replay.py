"""Simulator against closed forms: unloaded latency, processor-shared links, M/D/1, backpressure."""

from __future__ import annotations

import numpy as np
import pytest
from sim_builders import MODEL, colocated_plan, constant_workload, disagg_plan, requests, two_node_cluster

from builders import make_cluster
from thunderserve.costmodel.comm import SEND_LATENCY_S
from thunderserve.costmodel.kv import kv_seconds_per_token, kv_transfer_time_s
from thunderserve.errors import PlanError
from thunderserve.plan import group_perf_of
from thunderserve.policy.batching import BatchingConfig
from thunderserve.policy.kv_blocks import BLOCK_TOKENS
from thunderserve.policy.step import ColocatedPolicy
from thunderserve.sim import SimConfig, simulate
from thunderserve.sim.decode_loop import _DecodeLoop

CLUSTER = two_node_cluster()


def decode_sum(perf, batch: int, ctx0: int, steps: int) -> float:  # type: ignore[no-untyped-def]
    return sum(perf.decode_time_s(batch, batch * (ctx0 + k)) for k in range(steps))


@pytest.mark.parametrize("policy", list(ColocatedPolicy))
def test_colocated_single_request_has_the_unloaded_latency_exactly(policy: ColocatedPolicy) -> None:
    plan = colocated_plan()
    perf = group_perf_of(plan.groups[0], MODEL, CLUSTER)
    r = simulate(plan, CLUSTER, MODEL, *requests([1.0], 100, 5), SimConfig(colocated_policy=policy, warmup_s=0))
    ttft = perf.prefill_time_s(100, 100**2, 1)
    assert r.ttft_s[0] == pytest.approx(ttft, rel=1e-12)
    assert r.finish_s[0] == pytest.approx(1.0 + ttft + decode_sum(perf, 1, 100, 4), rel=1e-12)
    assert r.tpot_s[0] == pytest.approx(decode_sum(perf, 1, 100, 4) / 4, rel=1e-12)


def test_disaggregated_single_request_pays_prefill_transfer_and_decode() -> None:
    plan = disagg_plan()
    p_perf = group_perf_of(plan.group("p0"), MODEL, CLUSTER)
    d_perf = group_perf_of(plan.group("d0"), MODEL, CLUSTER)
    spt = kv_seconds_per_token(MODEL, [([CLUSTER.by_id["a:0"]], 2)], [CLUSTER.by_id["b:0"]], CLUSTER)
    r = simulate(plan, CLUSTER, MODEL, *requests([0.0], 200, 3), SimConfig(warmup_s=0))
    ttft = p_perf.prefill_time_s(200, 200**2, 1)
    transfer = kv_transfer_time_s(200, spt)
    assert transfer > 0
    assert r.first_token_s[0] == pytest.approx(ttft, rel=1e-12)
    assert r.finish_s[0] == pytest.approx(ttft + transfer + decode_sum(d_perf, 1, 200, 2), rel=1e-12)
    assert r.decode_group[0] == 1 and r.entry_group[0] == 0


@pytest.mark.parametrize("ideal", [False, True])
def test_concurrent_transfers_share_the_link(ideal: bool) -> None:
    plan = disagg_plan()
    p_perf = group_perf_of(plan.group("p0"), MODEL, CLUSTER)
    d_perf = group_perf_of(plan.group("d0"), MODEL, CLUSTER)
    spt = kv_seconds_per_token(MODEL, [([CLUSTER.by_id["a:0"]], 2)], [CLUSTER.by_id["b:0"]], CLUSTER)
    r = simulate(plan, CLUSTER, MODEL, *requests([0.0, 0.0], 300, 4), SimConfig(warmup_s=0, ideal_kv_links=ideal))
    ttft = p_perf.prefill_time_s(600, 2 * 300**2, 2)  # both prompts in one batch
    # each gets half the bandwidth (then one message latency)
    shared = 0.0 if ideal else 2 * kv_transfer_time_s(300, spt) - SEND_LATENCY_S
    assert np.allclose(r.first_token_s, ttft, rtol=1e-12)
    assert np.allclose(r.finish_s, ttft + shared + decode_sum(d_perf, 2, 300, 3), rtol=1e-12)


def test_compression_shortens_the_transfer() -> None:
    args = requests([0.0], 2000, 2)
    plain = simulate(disagg_plan("none"), CLUSTER, MODEL, *args, SimConfig(warmup_s=0))
    int4 = simulate(disagg_plan("int4"), CLUSTER, MODEL, *args, SimConfig(warmup_s=0))
    assert int4.finish_s[0] < plain.finish_s[0]
    assert int4.first_token_s[0] == plain.first_token_s[0]


def test_md1_mean_wait_matches_pollaczek_khinchine() -> None:
    # One prefill path, batch size 1, identical prompts, single-token outputs: an M/D/1 queue.
    plan = disagg_plan()
    service = group_perf_of(plan.group("p0"), MODEL, CLUSTER).prefill_time_s(500, 500**2, 1)
    rho = 0.7
    rate = rho / service
    arrivals, prompts, outputs = constant_workload(500, 1).poisson_requests(rate, 40000 / rate, seed=3)
    cfg = SimConfig(warmup_s=0, batching=BatchingConfig(max_batch_size=1))
    r = simulate(plan, CLUSTER, MODEL, arrivals, prompts, outputs, cfg)
    wait = float(np.mean(r.ttft_s - service))
    expect = rho * service / (2 * (1 - rho))
    assert wait == pytest.approx(expect, rel=0.05)
    assert np.all(r.finish_s == r.first_token_s)  # one-token outputs finish at prefill


def _watch_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every group's used KV blocks after each admission and step allocation (and check the bound)."""
    seen: list[int] = []
    admit, grow = _DecodeLoop.admit, _DecodeLoop.grow

    def admit_(self: _DecodeLoop, r: int) -> int:
        out = admit(self, r)
        assert self.used_blocks <= self.total_blocks
        seen.append(self.used_blocks)
        return out

    def grow_(self: _DecodeLoop) -> bool:
        out = grow(self)
        assert self.used_blocks <= self.total_blocks
        seen.append(self.used_blocks)
        return out

    monkeypatch.setattr(_DecodeLoop, "admit", admit_)
    monkeypatch.setattr(_DecodeLoop, "grow", grow_)
    return seen


@pytest.mark.parametrize("plan", ["colocated", "disaggregated"])
def test_kv_memory_full_preempts_and_recomputes_but_never_drops(plan: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = two_node_cluster(small=True)
    the_plan = colocated_plan("b:0") if plan == "colocated" else disagg_plan()
    group = the_plan.groups[-1]
    cap = group_perf_of(group, MODEL, cluster).kv_capacity_tokens
    if plan == "colocated":
        assert 2 * 1400 <= cap < 3 * 1400  # two requests of 1000 + 400 tokens fit at a time
    seen = _watch_blocks(monkeypatch)
    n = max(8, 3 * cap // 1400)
    r = simulate(the_plan, cluster, MODEL, *requests([0.0] * n, 1000, 400), SimConfig(warmup_s=0))
    assert np.isfinite(r.finish_s).all() and r.completed and r.events > 0
    assert np.all(r.finish_s >= r.first_token_s)
    assert r.preemptions > 0  # admitted by their prompts, they outgrow the memory and some are recomputed
    assert max(seen) <= cap // BLOCK_TOKENS and max(seen) > (cap // BLOCK_TOKENS) * 0.9
    assert r.oversized_requests == 0


def test_admission_reads_prompts_never_output_lengths() -> None:
    """The same prompts with 400 or 4,000 output tokens are admitted alike: three 1,000-token prompts fit in the
    colocated group's blocks at once, whatever they will generate (a reservation of prompt + output would
    have admitted two, or none of the long ones)."""
    cluster = two_node_cluster(small=True)
    plan = colocated_plan("b:0")
    cfg = SimConfig(warmup_s=0)
    short = simulate(plan, cluster, MODEL, *requests([0.0] * 4, 1000, 400), cfg)
    long = simulate(plan, cluster, MODEL, *requests([0.0] * 4, 1000, 4000), cfg)
    assert np.array_equal(short.first_token_s[:3], long.first_token_s[:3])
    assert np.all(long.first_token_s[:3] < long.first_token_s[3])  # the fourth's prompt does not fit
    assert np.isfinite(long.finish_s).all() and long.preemptions > 0


def test_decode_memory_full_backs_up_to_the_prefill_group() -> None:
    cluster = two_node_cluster(small=True)
    plan = disagg_plan()
    r = simulate(plan, cluster, MODEL, *requests([0.0] * 10, 1000, 400), SimConfig(warmup_s=0))
    assert np.isfinite(r.finish_s).all()
    # The decode group runs two at a time: the last pair finishes about five decode lifetimes after the first.
    order = np.sort(r.finish_s)
    assert order[-1] - order[0] > 3 * (order[1] - r.first_token_s.min())


def test_a_request_larger_than_the_whole_kv_memory_runs_alone() -> None:
    cluster = two_node_cluster(small=True)
    plan = colocated_plan("b:0")
    r = simulate(plan, cluster, MODEL, *requests([0.0, 0.0, 0.0], 2000, 1500), SimConfig(warmup_s=0))
    assert np.isfinite(r.finish_s).all() and r.oversized_requests == 3
    assert r.first_token_s[1] >= r.finish_s[0] and r.first_token_s[2] >= r.finish_s[1]


def test_zero_bandwidth_kv_link_is_rejected_before_simulating() -> None:
    cut = make_cluster((("a", "TOY", 2), ("b", "TOY", 2)), links=[{"between": ["a", "b"], "gbps": 0}])
    with pytest.raises(PlanError, match="zero-bandwidth"):
        simulate(disagg_plan(), cut, MODEL, *requests([0.0], 100, 2))


def test_same_seed_same_records() -> None:
    wl = constant_workload(300, 20)
    a = wl.poisson_requests(50.0, 20.0, seed=7)
    r1 = simulate(disagg_plan("int4"), CLUSTER, MODEL, *a)
    r2 = simulate(disagg_plan("int4"), CLUSTER, MODEL, *a)
    assert np.array_equal(r1.finish_s, r2.finish_s) and np.array_equal(r1.first_token_s, r2.first_token_s)
    assert r1.events == r2.events


def test_unsorted_arrivals_are_rejected() -> None:
    with pytest.raises(ValueError, match="sorted"):
        simulate(colocated_plan(), CLUSTER, MODEL, *requests([1.0, 0.0], 10, 2))


def test_prefill_first_allocates_blocks_only_for_steps_that_decode() -> None:
    """Found by the property test: prefill steps postpone decoding, and blocks allocated for a decode step that did
    not run leaked until a prompt that fits the empty memory could never be admitted."""
    from builders import TOY_GPU, make_plan

    small = {**TOY_GPU, "name": "SMALL", "memory_gb": 1.33}
    cluster = make_cluster((("a", "TOY", 2), ("b", "SMALL", 2)), default_gbps=10.0, gpu_types=(TOY_GPU, small))
    plan = make_plan([("c2", "colocated", [["b:0"]], [0, 2])], entry={"c2": 1.0})
    prompts = np.array([1] * 22 + [15] + [1] * 6 + [3025])
    outputs = np.array([1] * 21 + [2, 3] + [1] * 7)
    cfg = SimConfig(batching=BatchingConfig(prefill_token_budget=64, max_batch_size=2, chunk_token_budget=64),
                    colocated_policy=ColocatedPolicy.PREFILL_FIRST, warmup_s=0)
    r = simulate(plan, cluster, MODEL, np.zeros(30), prompts, outputs, cfg)
    assert np.isfinite(r.finish_s).all() and r.oversized_requests == 0
