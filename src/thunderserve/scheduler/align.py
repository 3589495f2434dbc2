"""Layer alignment of a prefill group with its decode partner on the same nodes.

The layout DP lays a group out alone, so a prefill group may cut its layers at other points than the decode
group beside it on the same nodes (e.g. 0-28 | 28-44 | 44-60 against 0-30 | 30-60). KV moves segment by
segment, each layer's cache to the decode stage holding that layer, so a misaligned cut sends those layers'
KV over the slow cross-node link where an aligned one keeps all of it inside each node (DistServe's
low-affinity placement). `aligned_prefill` keeps the prefill layout's stages and moves its cuts onto the
decode partner's node boundaries; the evaluator keeps it when that serves more on the pair's link.
"""

from __future__ import annotations

from collections.abc import Sequence

from thunderserve.plan.model import Stage
from thunderserve.spec.cluster import Cluster

Stages = tuple[Stage, ...]


def node_runs(cluster: Cluster, stages: Sequence[Stage]) -> list[tuple[int, int, int, int]] | None:
    """(node index, first layer, end layer, stage count) per node, in pipeline order; None when a stage spans
    nodes or a node's stages are not consecutive."""
    runs: list[tuple[int, int, int, int]] = []
    for st in stages:
        nodes = {cluster.by_id[g].node_index for g in st.gpus}
        if len(nodes) != 1:
            return None
        n = nodes.pop()
        if runs and runs[-1][0] == n:
            node, lo, _, count = runs[-1]
            runs[-1] = (node, lo, st.layers[1], count + 1)
        elif any(r[0] == n for r in runs):
            return None
        else:
            runs.append((n, st.layers[0], st.layers[1], 1))
    return runs


def _split(total: int, weights: Sequence[int]) -> list[int] | None:
    """`total` layers over stages in proportion to `weights` (largest remainder), each at least 1."""
    if total < len(weights):
        return None
    w = sum(weights)
    raw = [total * x / w for x in weights]
    counts = [max(1, int(r)) for r in raw]
    while sum(counts) > total:
        i = max((i for i in range(len(counts)) if counts[i] > 1), key=lambda i: counts[i] - raw[i])
        counts[i] -= 1
    while sum(counts) < total:
        i = max(range(len(counts)), key=lambda i: raw[i] - counts[i])
        counts[i] += 1
    return counts


def aligned_prefill(cluster: Cluster, prefill: Sequence[Stage], decode: Sequence[Stage]) -> Stages | None:
    """The prefill stages with layers re-cut so that each node holds the same layers as in `decode`; None when
    the two do not visit the same nodes in the same order (one run per node), or are aligned already."""
    pr, dr = node_runs(cluster, prefill), node_runs(cluster, decode)
    if pr is None or dr is None or [r[0] for r in pr] != [r[0] for r in dr]:
        return None
    if all(p[1:3] == d[1:3] for p, d in zip(pr, dr, strict=True)):
        return None
    out: list[Stage] = []
    i = 0
    for (_, _, _, count), (_, lo, hi, _) in zip(pr, dr, strict=True):
        mine = prefill[i:i + count]
        i += count
        counts = _split(hi - lo, [st.num_layers for st in mine])
        if counts is None:
            return None
        for st, c in zip(mine, counts, strict=True):
            out.append(Stage(gpus=st.gpus, layers=(lo, lo + c)))
            lo += c
    return tuple(out)
