"""Canonical keys of GPU sets and layouts, up to interchangeable nodes, so the planner's memo tables hit.

Two nodes are interchangeable when they hold the same GPU type with the same intra-node link. A GPU set is
then priced (layout, step times, capacities) by its *shape*: the (node class, GPU count) of each of its
nodes in cluster order, plus the bandwidth and same-zone pattern between those nodes. Two sets with the same
shape get the same layout up to relabelling GPUs position by position, so a 128-node cluster of four GPU
types needs a handful of layout computations per group size instead of one per node.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence

from thunderserve.plan.model import Stage
from thunderserve.spec.cluster import Cluster, GpuRef

GroupShape = tuple[tuple[tuple[int, int], ...], tuple[float, ...], tuple[bool, ...]]
StageDesc = tuple[tuple[tuple[int, int], ...], int]  # ((node position, GPUs), ...), layers
LayoutSig = tuple[GroupShape, tuple[StageDesc, ...]]


class Shapes:
    """Node classes of a cluster and the canonical keys built from them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        bw = cluster.node_bandwidth_bytes_s
        first: dict[int, GpuRef] = {}
        for g in cluster.gpus:
            first.setdefault(g.node_index, g)
        classes: dict[tuple[object, float], int] = {}
        nodes = range(len(cluster.node_names))  # a node may have no GPUs left (e.g. after failures)
        self.node_class = [classes.setdefault((first[n].spec, float(bw[n, n])), len(classes)) if n in first
                           else -1 - n for n in nodes]
        self.zone = [first[n].zone if n in first else "" for n in nodes]
        self._node_of = {g.id: g.node_index for g in cluster.gpus}

    def nodes(self, gpu_ids: Iterable[str]) -> tuple[list[int], Counter[int]]:
        counts = Counter(self._node_of[g] for g in gpu_ids)
        return sorted(counts), counts

    def group_shape(self, gpu_ids: Iterable[str]) -> GroupShape:
        nodes, counts = self.nodes(gpu_ids)
        bw = self.cluster.node_bandwidth_bytes_s
        pairs = list(itertools.combinations(nodes, 2))
        return (tuple((self.node_class[n], counts[n]) for n in nodes),
                tuple(float(bw[a, b]) for a, b in pairs),
                tuple(self.zone[a] == self.zone[b] for a, b in pairs))

    def layout_sig(self, stages: Sequence[Stage]) -> LayoutSig:
        """Key of a laid-out group: equal keys have identical cost models (`GroupPerf`)."""
        all_gpus = [g for s in stages for g in s.gpus]
        nodes, _ = self.nodes(all_gpus)
        pos = {n: i for i, n in enumerate(nodes)}
        descs = tuple((tuple(sorted(Counter(pos[self._node_of[g]] for g in s.gpus).items())), s.num_layers)
                      for s in stages)
        return self.group_shape(all_gpus), descs

    def relabel(self, stages: Sequence[Stage], gpu_ids: Iterable[str]) -> tuple[Stage, ...]:
        """The same layout on another GPU set of the same shape: node by node in cluster order, GPU by GPU in
        index order inside each node."""
        index = self.cluster.index_of

        def by_node(ids: Iterable[str]) -> list[list[str]]:
            groups: dict[int, list[str]] = {}
            for g in sorted(ids, key=index.__getitem__):
                groups.setdefault(self._node_of[g], []).append(g)
            return [groups[n] for n in sorted(groups)]

        src = by_node(g for s in stages for g in s.gpus)
        dst = by_node(gpu_ids)
        mapping = {a: b for s_node, d_node in zip(src, dst, strict=True)
                   for a, b in zip(s_node, d_node, strict=True)}
        return tuple(Stage(gpus=tuple(mapping[g] for g in s.gpus), layers=s.layers) for s in stages)
