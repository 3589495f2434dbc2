"""The tabu search's starting point: a bandwidth-aware grouping of the cluster's GPUs.

1. Nodes are clustered by the bandwidth between them (Louvain communities on the node graph weighted by
   link bandwidth, seeded), so GPUs on fast links start together.
2. Inside a community, nodes of one GPU type are cut into equal groups of the size that gives the most
   requests per second per GPU (a group must hold the model with room for KV; candidates: 1, 2, 4, ... GPUs
   of a node, or 2, 3, 4 whole nodes). Leftover GPUs join the last group of their kind. Alternatively the
   community is cut into runs of 2..max_pp whole nodes of mixed types, when that serves more in total.
3. GPUs of types that cannot hold the model alone are pooled per community (then across the cluster) and
   cut the same way, so mixed-type groups appear only where needed.

`typed_node_runs` adds the standard homogeneous starts a vLLM user would try: each GPU type's nodes in runs of k
whole nodes (one group each; the layout DP lays it out, e.g. TP2 x PP4 over two 4-GPU nodes). Summed stand-alone
capacities (what step 2 ranks by) can prefer two single-node groups where the routed plan prefers one pipeline
over both nodes; the planner scores these starts with its full objective instead. `typed_node_pairs` splits the
same runs into prefill and decode halves on every node: DistServe's low-affinity placement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import networkx as nx

from thunderserve.plan.model import Phase
from thunderserve.scheduler.context import PlanningContext
from thunderserve.spec.cluster import GpuRef

GroupKey = frozenset[str]


def node_communities(ctx: PlanningContext, seed: int) -> list[list[int]]:
    """Node indices clustered by bandwidth (fast links together), sorted for determinism."""
    n = len(ctx.cluster.node_names)
    if n == 1:
        return [[0]]
    bw = ctx.cluster.node_bandwidth_bytes_s
    graph = nx.Graph()
    graph.add_nodes_from(range(n))
    top = max(float(bw[i, j]) for i in range(n) for j in range(n) if i != j) or 1.0
    for i in range(n):
        for j in range(i + 1, n):
            w = float(bw[i, j]) / top
            if w > 0:
                graph.add_edge(i, j, weight=w * w)  # squared: emphasise the fast links
    comms = nx.community.louvain_communities(graph, weight="weight", seed=seed, resolution=1.0)
    return sorted((sorted(c) for c in comms), key=lambda c: c[0])


def group_score(ctx: PlanningContext, key: GroupKey, phases: Sequence[Phase]) -> float:
    """Requests/s a group of these GPUs serves in its best use: colocated, or as half of a prefill/decode
    pair (harmonic combination of its prefill and decode capacities)."""
    best = 0.0
    caps: dict[Phase, float] = {}
    for ph in phases:
        lay = ctx.layout(key, ph)
        if lay is None:
            continue
        caps[ph] = ctx.standalone_capacity(lay.stages, ph)
    if Phase.COLOCATED in caps:
        best = caps[Phase.COLOCATED]
    pre, dec = caps.get(Phase.PREFILL, 0.0), caps.get(Phase.DECODE, 0.0)
    if pre > 0 and dec > 0:
        best = max(best, 1.0 / (1.0 / pre + 1.0 / dec))
    elif len(phases) == 1 and caps:
        best = max(best, max(caps.values()))
    return best


def _cut(gpus: Sequence[GpuRef], size: int) -> list[list[GpuRef]]:
    groups = [list(gpus[i:i + size]) for i in range(0, len(gpus) - size + 1, size)]
    rest = list(gpus[len(groups) * size:])
    if rest:
        if groups:
            groups[-1].extend(rest)
        else:
            groups.append(rest)
    return groups


def _unit_sizes(gpus: Sequence[GpuRef]) -> list[int]:
    per_node: dict[int, int] = {}
    for g in gpus:
        per_node[g.node_index] = per_node.get(g.node_index, 0) + 1
    node_size = max(per_node.values())
    sizes = {1 << k for k in range(int(math.log2(node_size)) + 1)} | {node_size}
    sizes |= {node_size * k for k in (2, 3, 4)}
    return sorted(s for s in sizes if s <= len(gpus))


def best_cut(ctx: PlanningContext, gpus: Sequence[GpuRef], phases: Sequence[Phase]) -> tuple[int, float]:
    """(unit size, score per GPU) of the best equal cut of a run of GPUs; (0, 0) if no unit holds the model.

    When no unit can meet the SLO at all (every score 0), the smallest unit that holds the model is used.
    """
    best = (0, 0.0)
    smallest_feasible = 0
    for size in _unit_sizes(gpus):
        key = frozenset(g.id for g in gpus[:size])
        if not smallest_feasible and any(ctx.layout(key, ph) is not None for ph in phases):
            smallest_feasible = size
        s = group_score(ctx, key, phases) / size
        if s > best[1] * (1 + 1e-9):
            best = (size, s)
    if best[0] == 0 and smallest_feasible:
        return smallest_feasible, 0.0
    return best


def _node_chunks(nodes: Sequence[list[GpuRef]], k: int, max_pp: int) -> list[list[GpuRef]]:
    """Consecutive runs of k whole nodes; a short tail joins the last run while it stays within max_pp nodes."""
    chunks = [[g for n in nodes[i:i + k] for g in n] for i in range(0, len(nodes), k)]
    if len(chunks) > 1 and len(nodes) % k and len(nodes) % k + k <= max_pp:
        tail = chunks.pop()
        chunks[-1].extend(tail)
    return chunks


def _per_type_cut(ctx: PlanningContext, by_type: dict[str, list[GpuRef]], phases: Sequence[Phase]
                  ) -> tuple[list[list[GpuRef]], list[GpuRef]]:
    """Each GPU type of a community cut into equal groups of its best size; (groups, GPUs that fit nowhere)."""
    groups: list[list[GpuRef]] = []
    leftovers: list[GpuRef] = []
    for name in sorted(by_type):
        run = by_type[name]
        size, _ = best_cut(ctx, run, phases)
        if size == 0:
            leftovers.extend(run)
        else:
            groups.extend(_cut(run, size))
    return groups, leftovers


def _total(ctx: PlanningContext, groups: Sequence[Sequence[GpuRef]], phases: Sequence[Phase]) -> float:
    return sum(group_score(ctx, frozenset(g.id for g in grp), phases) for grp in groups)


def initial_groups(ctx: PlanningContext, seed: int, phases: Sequence[Phase],
                   deadline: float = float("inf")) -> list[GroupKey]:
    """The starting grouping (every GPU in exactly one group; a group may be too small to be used).

    Per bandwidth community, the better (by summed stand-alone capacity) of: each GPU type cut into equal
    groups of its best size, or runs of k = 2..max_pp whole nodes (nodes ordered by GPU type) — larger
    pipelines hold more KV cache per GPU, which batching turns into throughput. Past `deadline`
    (time.monotonic) only the per-type cut is tried.
    """
    cluster = ctx.cluster
    groups: list[list[GpuRef]] = []
    pooled: list[list[GpuRef]] = []
    for comm in node_communities(ctx, seed):
        by_type: dict[str, list[GpuRef]] = {}
        by_node: dict[int, list[GpuRef]] = {}
        for ni in comm:
            for g in cluster.gpus:
                if g.node_index == ni:
                    by_type.setdefault(g.spec.name, []).append(g)
                    by_node.setdefault(ni, []).append(g)
        typed, leftovers = _per_type_cut(ctx, by_type, phases)
        best = (_total(ctx, typed, phases), typed, leftovers)
        nodes = [by_node[n] for n in sorted(by_node, key=lambda n: (by_node[n][0].spec.name, n))]
        for k in range(2, min(ctx.max_pp, len(nodes)) + 1):
            if time.monotonic() >= deadline:
                break
            chunks = _node_chunks(nodes, k, ctx.max_pp)
            total = _total(ctx, chunks, phases)
            if total > best[0] * (1 + 1e-6):
                best = (total, chunks, [])
        groups.extend(best[1])
        if best[2]:
            pooled.append(best[2])
    rest: list[GpuRef] = []
    for pool in pooled:
        pool.sort(key=lambda g: cluster.index_of[g.id])
        size, _ = best_cut(ctx, pool, phases)
        if size == 0:
            rest.extend(pool)
        else:
            groups.extend(_cut(pool, size))
    if rest:
        rest.sort(key=lambda g: cluster.index_of[g.id])
        size, _ = best_cut(ctx, rest, phases)
        groups.extend(_cut(rest, size) if size else [rest])
    return [frozenset(g.id for g in grp) for grp in groups]


def typed_node_runs(ctx: PlanningContext, k_of_type: dict[str, int]) -> list[GroupKey]:
    """Every GPU of each type in runs of `k_of_type[type]` whole nodes of that type (nodes in cluster order;
    a short tail joins the last run while it stays within max_pp nodes); types not listed: one group per node."""
    cluster = ctx.cluster
    by_type: dict[str, dict[int, list[GpuRef]]] = {}
    for g in cluster.gpus:
        by_type.setdefault(g.spec.name, {}).setdefault(g.node_index, []).append(g)
    groups: list[GroupKey] = []
    for name in sorted(by_type):
        nodes = [by_type[name][n] for n in sorted(by_type[name])]
        for chunk in _node_chunks(nodes, max(1, k_of_type.get(name, 1)), ctx.max_pp):
            groups.append(frozenset(g.id for g in chunk))
    return groups


def typed_node_pairs(ctx: PlanningContext, k_of_type: dict[str, int]) -> list[tuple[GroupKey, Phase]]:
    """DistServe's low-affinity placement as a start: the runs of `typed_node_runs`, each split into a prefill
    group (the first half of every node's GPUs) and a decode group (the rest), so each node holds a prefill and
    a decode segment of the same layers once aligned (`align`) and the KV cache stays inside the node. A run
    with a single-GPU node stays one colocated group."""
    by_id = ctx.cluster.by_id
    out: list[tuple[GroupKey, Phase]] = []
    for key in typed_node_runs(ctx, k_of_type):
        per_node: dict[int, list[str]] = {}
        for g in sorted(key, key=ctx.cluster.index_of.__getitem__):
            per_node.setdefault(by_id[g].node_index, []).append(g)
        if min(len(v) for v in per_node.values()) < 2:
            out.append((key, Phase.COLOCATED))
            continue
        out.append((frozenset(g for v in per_node.values() for g in v[:len(v) // 2]), Phase.PREFILL))
        out.append((frozenset(g for v in per_node.values() for g in v[len(v) // 2:]), Phase.DECODE))
    return out
