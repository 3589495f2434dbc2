"""Simulator invariants over random small plans and workloads: every request finishes exactly once,
in causal order, whatever the phases, routing, batching limits and KV memory pressure."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from builders import TOY_GPU, make_cluster, make_model, make_plan
from thunderserve.plan import validate_plan
from thunderserve.policy.batching import BatchingConfig
from thunderserve.policy.step import ColocatedPolicy
from thunderserve.sim import SimConfig, simulate

MODEL = make_model()
SMALL = {**TOY_GPU, "name": "SMALL", "memory_gb": 1.33}  # ~3,000 KV tokens: forces backpressure
CLUSTER = make_cluster((("a", "TOY", 2), ("b", "SMALL", 2)), default_gbps=10.0, gpu_types=(TOY_GPU, SMALL))
GPUS = ["a:0", "a:1", "b:0", "b:1"]


@st.composite
def plans(draw):  # type: ignore[no-untyped-def]
    phases = draw(st.lists(st.sampled_from(["prefill", "decode", "colocated"]), min_size=1, max_size=4))
    if "prefill" in phases and "decode" not in phases:
        phases[-1] = "decode" if len(phases) > 1 else "colocated"
    if not any(p in ("prefill", "colocated") for p in phases):
        phases[0] = "colocated"
    groups = []
    for i, phase in enumerate(phases):
        pp = draw(st.sampled_from([1, 2])) if i == 0 and len(phases) == 1 else 1
        stages = [[GPUS[i]]] if pp == 1 else [[GPUS[0]], [GPUS[1]]]
        bounds = [0, 2] if pp == 1 else [0, 1, 2]
        groups.append((f"{phase[0]}{i}", phase, stages, bounds))
    takers = [g[0] for g in groups if g[1] != "decode"]
    decoders = [g[0] for g in groups if g[1] == "decode"]
    weights = draw(st.lists(st.floats(0.1, 5), min_size=len(takers), max_size=len(takers)))
    entry = {t: w / sum(weights) for t, w in zip(takers, weights, strict=True)}
    kv = {g[0]: {d: 1.0 / len(decoders) for d in decoders} for g in groups if g[1] == "prefill"}
    return make_plan(groups, entry=entry, kv=kv, compression=draw(st.sampled_from(["none", "int8", "int4"])))


@st.composite
def workloads(draw):  # type: ignore[no-untyped-def]
    n = draw(st.integers(1, 30))
    arrivals = np.sort(np.asarray(draw(st.lists(st.floats(0, 0.05), min_size=n, max_size=n))))
    prompts = np.asarray(draw(st.lists(st.integers(1, 4000), min_size=n, max_size=n)))
    outputs = np.asarray(draw(st.lists(st.integers(1, 60), min_size=n, max_size=n)))
    return arrivals, prompts, outputs


@settings(max_examples=150, deadline=None)
@given(plans(), workloads(), st.sampled_from(list(ColocatedPolicy)), st.integers(1, 8), st.integers(64, 4096),
       st.booleans())
def test_every_request_finishes_exactly_once_in_order(plan, wl, policy, max_batch, budget, ideal) -> None:  # type: ignore[no-untyped-def]
    validate_plan(plan, CLUSTER, MODEL)
    cfg = SimConfig(batching=BatchingConfig(prefill_token_budget=budget, max_batch_size=max_batch,
                                            chunk_token_budget=budget),
                    colocated_policy=policy, ideal_kv_links=ideal, warmup_s=0.0)
    r = simulate(plan, CLUSTER, MODEL, *wl, cfg)  # raises if any request is left unfinished
    assert r.completed and r.num_requests == wl[0].size
    assert np.isfinite(r.first_token_s).all() and np.isfinite(r.finish_s).all()
    assert (r.first_token_s >= r.arrival_s).all() and (r.finish_s >= r.first_token_s).all()
    assert ((r.finish_s > r.first_token_s) == (r.output_tokens > 1)).all()
    phases = {i: g.phase for i, g in enumerate(plan.groups)}
    assert all(phases[int(g)] != "decode" for g in r.entry_group)
    assert all(int(d) == -1 or phases[int(d)] == "decode" for d in r.decode_group)
    assert r.end_s >= r.finish_s.max() - 1e-12
    again = simulate(plan, CLUSTER, MODEL, *wl, cfg)
    assert np.array_equal(again.finish_s, r.finish_s)


@settings(max_examples=40, deadline=None)
@given(plans(), st.integers(2, 16), st.integers(0, 10**6), st.sampled_from(list(ColocatedPolicy)))
def test_paged_kv_memory_preempts_yet_every_request_finishes_once(plan, n, seed, policy) -> None:  # type: ignore[no-untyped-def]
    """Long outputs on ~3,000-token KV memories: sequences outgrow the blocks they were admitted with, the latest
    admitted are preempted and recomputed, and still every request finishes exactly once."""
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.uniform(0, 0.05, n))
    prompts, outputs = rng.integers(100, 1500, n), rng.integers(200, 1200, n)
    cfg = SimConfig(colocated_policy=policy, warmup_s=0.0)
    r = simulate(plan, CLUSTER, MODEL, arrivals, prompts, outputs, cfg)  # raises if any is left unfinished
    assert r.completed and np.isfinite(r.finish_s).all() and (r.finish_s > r.first_token_s).all()
    assert r.preemptions >= 0
    again = simulate(plan, CLUSTER, MODEL, arrivals, prompts, outputs, cfg)
    assert np.array_equal(again.finish_s, r.finish_s) and again.preemptions == r.preemptions
