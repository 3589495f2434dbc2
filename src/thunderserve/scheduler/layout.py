"""Parallel layout of one group: TP degree per stage, stage order, and the layer split (by DP).

Given a set of GPUs, enumerate how to cut it into tensor-parallel stages and order them:
  * TP sets stay inside a node (fast intra-node link); each node's GPUs are cut into power-of-two TP degrees
    dividing the head count, degrees may differ between stages (asymmetric TP); at most `max_pp` stages.
    Only when no such layout exists do TP sets span nodes (same zone and GPU type first, then any).
  * Nodes are ordered so the slowest link between consecutive stages is as fast as possible.
For each ordered stage list the layers are split by dynamic programming over (stage, layers so far): a stage's
time is linear in its layer count (roofline terms from `costmodel.stage_perf` at one layer), so slower or
smaller GPUs get fewer layers. Prefill minimises the bottleneck stage time (pipelined batches), decode and
colocated minimise the summed step time; every stage must keep at least `kv_floor` tokens of KV memory, and
the DP is repeated for a few KV floors (minimum, half and all of the best achievable), because decode wants KV capacity.
Candidates are ranked by a phase proxy (or by a caller's `score`, e.g. the queueing capacity).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from thunderserve.costmodel.perf import (
    ACTIVATION_TOKENS,
    MEMORY_UTILIZATION,
    RUNTIME_OVERHEAD_BYTES,
    GroupPerf,
    stage_perf,
)
from thunderserve.plan.model import Phase, Stage
from thunderserve.scheduler.perfvec import _allreduce_s, decode_step_s, prefill_times_s
from thunderserve.spec.cluster import Cluster, GpuRef
from thunderserve.spec.model import ModelSpec

MIN_KV_TOKENS = 512  # a stage that cannot hold this much KV is not a useful layout
REF_PROMPT_TOKENS = 1024.0  # proxy prefill batch: one prompt of this length
REF_RESERVE_TOKENS = 1536.0  # proxy decode: KV reserved per running sequence
REF_DECODE_CONTEXT = 1024.0  # proxy decode: mean context per running sequence
MAX_REF_BATCH = 256
PROXY_TOP_K = 4  # candidates the (expensive) caller score looks at
PROXY_MAX_SCORED = 16  # ... and at most this many while every one scored so far scores 0


@dataclass(frozen=True)
class LayoutCandidate:
    stages: tuple[Stage, ...]
    perf: GroupPerf


# ------------------------------------------------------------------ TP sets and stage orders


def _tp_degrees(model: ModelSpec, count: int) -> list[int]:
    out, d = [], 1
    while d <= count:
        if model.num_heads % d == 0:
            out.append(d)
        d *= 2
    return out


def _compositions(count: int, degrees: Sequence[int], max_parts: int) -> list[tuple[int, ...]]:
    """Non-increasing tuples of `degrees` summing to `count`, at most `max_parts` long."""
    result: list[tuple[int, ...]] = []

    def rec(left: int, cap: int, acc: tuple[int, ...]) -> None:
        if left == 0:
            result.append(acc)
            return
        if len(acc) >= max_parts:
            return
        for d in sorted(degrees, reverse=True):
            if d <= cap and d <= left:
                rec(left - d, d, acc + (d,))

    rec(count, count, ())
    return result


def _domains(gpus: Sequence[GpuRef], level: int) -> list[list[GpuRef]]:
    """TP domains: level 0 = nodes, 1 = (zone, GPU type), 2 = GPU type, 3 = everything."""
    keyfn: Callable[[GpuRef], tuple[object, ...]] = [
        lambda g: (g.node_index,),
        lambda g: (g.zone, g.spec.name),
        lambda g: (g.spec.name,),
        lambda g: (),
    ][level]
    buckets: dict[tuple[object, ...], list[GpuRef]] = {}
    for g in gpus:
        buckets.setdefault(keyfn(g), []).append(g)
    return [buckets[k] for k in sorted(buckets, key=lambda k: min(x.node_index for x in buckets[k]))]


def _min_link(cluster: Cluster, a: Sequence[GpuRef], b: Sequence[GpuRef]) -> float:
    """Slowest link between two GPU sets (`Cluster.min_bandwidth_bytes_s` over node indices)."""
    bw = cluster.node_bandwidth_bytes_s
    na = {g.node_index for g in a}
    nb = {g.node_index for g in b}
    return float(min(bw[i, j] for i in na for j in nb))


def _group_perf(model: ModelSpec, sets: Sequence[Sequence[GpuRef]], counts: Sequence[int], cluster: Cluster,
                memo: dict[object, object]) -> GroupPerf:
    """`costmodel.group_perf` with each stage's `StagePerf` memoised by (shape, layers, first, last)."""
    n = len(sets)
    stages = []
    for i, (st, k) in enumerate(zip(sets, counts, strict=True)):
        key = ("stage", _shape(st), k, i == 0, i == n - 1)
        if key not in memo:
            memo[key] = stage_perf(model, st, k, cluster, first=i == 0, last=i == n - 1)
        stages.append(memo[key])
    sends = tuple(_min_link(cluster, sets[i], sets[i + 1]) for i in range(n - 1))
    return GroupPerf(tuple(stages), sends)  # type: ignore[arg-type]


def _domain_orders(domains: list[list[GpuRef]], cluster: Cluster, keep: int = 2) -> list[list[list[GpuRef]]]:
    """Orders of the domains whose slowest consecutive link is fastest (ties: larger summed bandwidth)."""
    if len(domains) == 1:
        return [domains]
    if len(domains) > 5:
        return [domains]
    scored = []
    for perm in itertools.permutations(range(len(domains))):
        links = [_min_link(cluster, domains[a], domains[b]) for a, b in itertools.pairwise(perm)]
        scored.append(((-min(links), -sum(links), perm), perm))
    scored.sort()
    return [[domains[i] for i in perm] for _, perm in scored[:keep]]


def _stage_sets(gpus: Sequence[GpuRef], model: ModelSpec, cluster: Cluster, max_pp: int
                ) -> list[list[list[GpuRef]]]:
    """Ordered lists of TP sets covering `gpus` (in-node TP first; wider TP domains only as a fallback)."""
    for level in range(4):
        domains = _domains(gpus, level)
        if len(domains) > max_pp:
            continue
        out: list[list[list[GpuRef]]] = []
        for order in _domain_orders(domains, cluster):
            per_domain = [_compositions(len(d), _tp_degrees(model, len(d)), max_pp) for d in order]
            for combo in itertools.product(*per_domain):
                if not all(combo) or sum(len(c) for c in combo) > max_pp:
                    continue
                sets: list[list[GpuRef]] = []
                for dom, comp in zip(order, combo, strict=True):
                    pos = 0
                    for d in comp:
                        sets.append(dom[pos:pos + d])
                        pos += d
                out.append(sets)
        if out:
            return out
    return []


# ------------------------------------------------------------------ per-stage linear coefficients


@dataclass(frozen=True)
class _StageCurve:
    """Time and KV capacity of one stage position as functions of its layer count (arrays over 0..L)."""

    time_s: np.ndarray
    kv_tokens: np.ndarray


def _stage_curve(model: ModelSpec, gpus: Sequence[GpuRef], cluster: Cluster, first: bool, last: bool,
                 phase: Phase | None) -> _StageCurve:
    """Exact `stage_perf` arithmetic as a function of the layer count ℓ = 0..L (vectorised)."""
    one = stage_perf(model, gpus, 1, cluster, first=first, last=last)
    L = model.num_layers
    ell = np.arange(L + 1, dtype=float)
    layer_w = float(model.layer_weight_bytes)
    lm_head_bytes = one.streamed_weight_bytes - layer_w
    if phase is Phase.PREFILL:
        tokens, sum_sq, seqs = REF_PROMPT_TOKENS, REF_PROMPT_TOKENS ** 2, 1.0
        flops_l = tokens * one.linear_flops_per_token
        flops_0 = seqs * one.lm_head_flops_per_seq
        attn_l = ((sum_sq + 2.0 * one.attn_pad_tokens * tokens) * one.attn_prefill_flops_per_sq_token
                  / one.attn_prefill_flops_s + one.attn_prefill_overhead_s)
    else:
        tokens = 64.0
        ctx = tokens * REF_DECODE_CONTEXT
        flops_l = tokens * one.linear_flops_per_token
        flops_0 = tokens * one.lm_head_flops_per_seq
        attn_l = ctx * one.kv_bytes_per_token / one.attn_decode_bytes_s + one.attn_decode_overhead_s
    comm_l = 2.0 * float(_allreduce_s(tokens * one.hidden_bytes_per_token, one.tp, one.link_bytes_s)) if one.tp > 1 else 0.0
    sat = getattr(one, "compute_saturation_tokens", 0.0)
    sat_factor = (tokens + sat) / tokens if sat > 0 else 1.0  # linear_time_s: compute saturates with tokens
    # StagePerf.step_time_s as a function of ℓ: the linear roofline over ℓ layers (+ LM head) plus per-layer terms
    time = (np.maximum((ell * flops_l + flops_0) / one.flops_s * sat_factor,
                       (ell * layer_w + lm_head_bytes) / one.mem_bytes_s)
            + ell * (attn_l + tokens * one.elementwise_s_per_token + comm_l + one.overhead_s) + one.step_overhead_s)
    # memory, as in stage_perf: weights/tp + activations + runtime overhead, KV in what is left
    extra = one.weight_bytes - layer_w
    tp = len(gpus)
    act = ACTIVATION_TOKENS * (4 * model.hidden_size + 2 * model.intermediate_size / tp) * model.dtype_bytes
    used = (ell * layer_w + extra) / tp + act + RUNTIME_OVERHEAD_BYTES
    cap = min(g.spec.memory_gb * 1e9 * MEMORY_UTILIZATION for g in gpus)
    shards = min(tp, model.num_kv_heads)
    per_tok = np.maximum(ell, 1.0) * model.kv_bytes_per_token_per_layer / shards
    kv = np.where(cap - used > 0, np.floor((cap - used) / per_tok), 0.0)
    time[0] = np.inf  # every stage holds at least one layer
    kv[0] = 0.0
    return _StageCurve(time, kv)


# ------------------------------------------------------------------ the layer DP


def _dp_index(num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """(clipped index of the layers before a stage, validity) over (layers after, layers in the stage)."""
    L = num_layers
    prev_idx = np.arange(L + 1)[:, None] - np.arange(L + 1)[None, :]
    return np.clip(prev_idx, 0, L), prev_idx >= 0


def split_layers(curves: Sequence[_StageCurve], num_layers: int, kv_floor: float, bottleneck: bool
                 ) -> list[int] | None:
    """Layer counts per stage minimising max (bottleneck) or sum of stage times, each stage keeping at least
    `kv_floor` KV tokens; None when no split satisfies memory. DP over (stage, layers assigned so far):
    best_i[l] = min over k of combine(best_{i-1}[l - k], time_i(k)), vectorised over (l, k)."""
    L = num_layers
    prev_idx, valid = _dp_index(L)
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    rows = np.arange(L + 1)
    choices = []
    for c in curves:
        cost = np.where(c.kv_tokens >= kv_floor, c.time_s, np.inf)
        prev = np.where(valid, best[prev_idx], np.inf)
        cand = np.maximum(prev, cost[None, :]) if bottleneck else prev + cost[None, :]
        choice = np.argmin(cand, axis=1)
        best = cand[rows, choice]
        choices.append(choice)
    if not np.isfinite(best[L]):
        return None
    counts, left = [], L
    for choice in reversed(choices):
        k = int(choice[left])
        counts.append(k)
        left -= k
    return counts[::-1]


def _max_min_kv(curves: Sequence[_StageCurve], num_layers: int) -> float:
    """The largest KV floor any split can keep on every stage (same DP, maximising the minimum)."""
    L = num_layers
    prev_idx, valid = _dp_index(L)
    best = np.full(L + 1, -np.inf)
    best[0] = np.inf
    for c in curves:
        kv = np.where(np.isfinite(c.time_s), c.kv_tokens, -np.inf)
        prev = np.where(valid, best[prev_idx], -np.inf)
        best = np.max(np.minimum(prev, kv[None, :]), axis=1)
    return float(best[L])


# ------------------------------------------------------------------ candidates and choice


def _to_stages(sets: Sequence[Sequence[GpuRef]], counts: Sequence[int]) -> tuple[Stage, ...]:
    out, start = [], 0
    for gpus, k in zip(sets, counts, strict=True):
        out.append(Stage(gpus=tuple(g.id for g in gpus), layers=(start, start + k)))
        start += k
    return tuple(out)


def _shape(gpus: Sequence[GpuRef]) -> tuple[tuple[int, int], ...]:
    counts: dict[int, int] = {}
    for g in gpus:
        counts[g.node_index] = counts.get(g.node_index, 0) + 1
    return tuple(sorted(counts.items()))


def layout_candidates(gpus: Sequence[GpuRef], cluster: Cluster, model: ModelSpec, max_pp: int = 4,
                      phase: Phase | None = None, memo: dict[object, object] | None = None
                      ) -> list[LayoutCandidate]:
    """Every (TP sets, order, KV floor) layout the DP finds feasible for this GPU set, deduplicated.

    `memo` (optional, caller-owned) caches stage curves and group costs by shape across calls: GPUs of one
    node are interchangeable, so a stage is priced by (node, count) pairs, its position and the phase.
    """
    memo = {} if memo is None else memo
    ordered = sorted(gpus, key=lambda g: cluster.index_of[g.id])
    seen: set[tuple[Stage, ...]] = set()
    out: list[LayoutCandidate] = []
    for sets in _stage_sets(ordered, model, cluster, max_pp):
        n = len(sets)
        if n > model.num_layers:
            continue
        curves = []
        for i, st in enumerate(sets):
            ckey = ("curve", _shape(st), i == 0, i == n - 1, phase)
            if ckey not in memo:
                memo[ckey] = _stage_curve(model, st, cluster, i == 0, i == n - 1, phase)
            curves.append(memo[ckey])
        top = _max_min_kv(curves, model.num_layers)  # type: ignore[arg-type]
        if top < MIN_KV_TOKENS:
            continue
        floors = sorted({MIN_KV_TOKENS, max(MIN_KV_TOKENS, top / 2), top})
        for floor in floors:
            counts = split_layers(curves, model.num_layers, floor, bottleneck=phase is Phase.PREFILL)  # type: ignore[arg-type]
            if counts is None:
                continue
            stages = _to_stages(sets, counts)
            if stages in seen:
                continue
            seen.add(stages)
            pkey = ("perf", tuple((_shape(st), k) for st, k in zip(sets, counts, strict=True)))
            if pkey not in memo:
                memo[pkey] = _group_perf(model, sets, counts, cluster, memo)
            perf = memo[pkey]
            assert isinstance(perf, GroupPerf)
            if perf.fits:
                out.append(LayoutCandidate(stages, perf))
    return out


def proxy_score(perf: GroupPerf, phase: Phase | None) -> float:
    """Workload-free throughput proxy (higher is better): prefills of a reference prompt per second for
    prefill groups; decode tokens per second at the batch the KV memory allows for the others."""
    if phase is Phase.PREFILL:
        _, bottleneck = prefill_times_s(perf, REF_PROMPT_TOKENS, REF_PROMPT_TOKENS ** 2, 1.0)
        return float(1.0 / bottleneck)
    n = float(min(MAX_REF_BATCH, max(perf.kv_capacity_tokens / REF_RESERVE_TOKENS, 1.0)))
    return float(n / decode_step_s(perf, n, n * REF_DECODE_CONTEXT))


Proxy = Callable[[GroupPerf], float]
Score = Callable[[GroupPerf, tuple[Stage, ...]], float]


def best_group_layout(gpu_ids: Sequence[str], cluster: Cluster, model: ModelSpec, max_pp: int = 4,
                      phase: Phase | None = None, *, score: Score | None = None, proxy: Proxy | None = None,
                      memo: dict[object, object] | None = None) -> tuple[Stage, ...] | None:
    """The best layout of these GPUs for `phase` (None: decode-like proxy), or None if the model cannot fit.

    Candidates are ranked by `proxy` (default `proxy_score`, workload-free); when `score` is given (e.g. the
    group's queueing capacity for the workload and SLO) the top few by proxy are re-ranked by it. Ties keep
    the first (deterministic).
    """
    found = _best(gpu_ids, cluster, model, max_pp, phase, score, proxy, memo)
    return None if found is None else found.stages


def _best(gpu_ids: Sequence[str], cluster: Cluster, model: ModelSpec, max_pp: int, phase: Phase | None,
          score: Score | None, proxy: Proxy | None = None, memo: dict[object, object] | None = None
          ) -> LayoutCandidate | None:
    gpus = [cluster.by_id[g] for g in gpu_ids]
    cands = layout_candidates(gpus, cluster, model, max_pp, phase, memo)
    if not cands:
        return None
    rank = proxy or (lambda perf: proxy_score(perf, phase))
    ranked = sorted(range(len(cands)), key=lambda i: (-rank(cands[i].perf), i))
    if score is None:
        return cands[ranked[0]]
    # the exact score for the proxy's top K; while none of them serves anything at the SLO (the proxy ranks by
    # throughput, and a TTFT-bound group wants latency), the next K, up to PROXY_MAX_SCORED
    best_i, best_s = ranked[0], 0.0
    for lo in range(0, min(len(ranked), PROXY_MAX_SCORED), PROXY_TOP_K):
        for i in ranked[lo:lo + PROXY_TOP_K]:
            s = score(cands[i].perf, cands[i].stages)
            if s > best_s:
                best_i, best_s = i, s
        if best_s > 0:
            break
    return cands[best_i]


def best_layout_candidate(gpu_ids: Sequence[str], cluster: Cluster, model: ModelSpec, max_pp: int = 4,
                          phase: Phase | None = None, *, score: Score | None = None, proxy: Proxy | None = None,
                          memo: dict[object, object] | None = None) -> LayoutCandidate | None:
    """`best_group_layout` returning the stages with their `GroupPerf`."""
    return _best(gpu_ids, cluster, model, max_pp, phase, score, proxy, memo)
