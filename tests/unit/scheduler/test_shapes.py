"""Canonical shapes: interchangeable nodes share layouts (relabelled), different links do not."""

from __future__ import annotations

from dataclasses import replace

from sched_builders import cluster, context

from thunderserve.plan import Phase
from thunderserve.scheduler import best_group_layout
from thunderserve.scheduler.shapes import Shapes


def test_equivalent_nodes_share_a_shape_and_a_relabelled_layout() -> None:
    c = cluster((("a", "TOY", 2), ("b", "TOY", 2), ("c", "SLOW", 2)), default_gbps=25)
    shapes = Shapes(c)
    assert shapes.group_shape(["a:0", "a:1"]) == shapes.group_shape(["b:1", "b:0"])
    assert shapes.group_shape(["a:0", "a:1"]) != shapes.group_shape(["c:0", "c:1"])
    assert shapes.group_shape(["a:0"]) != shapes.group_shape(["a:0", "a:1"])
    ctx = context(c)
    la = ctx.layout(frozenset({"a:0", "a:1"}), Phase.DECODE)
    lb = ctx.layout(frozenset({"b:0", "b:1"}), Phase.DECODE)
    assert la is not None and lb is not None
    assert sorted(g for s in lb.stages for g in s.gpus) == ["b:0", "b:1"]
    assert [(s.tp, s.layers) for s in la.stages] == [(s.tp, s.layers) for s in lb.stages]
    # b's layout found directly (a fresh context that never saw a) equals the one relabelled from a's shape
    direct = context(c).layout(frozenset({"b:0", "b:1"}), Phase.DECODE)
    assert direct is not None and [(s.tp, s.layers) for s in direct.stages] == [(s.tp, s.layers) for s in lb.stages]
    assert best_group_layout(["b:0", "b:1"], c, ctx.model, phase=Phase.DECODE) is not None


def test_links_between_nodes_are_part_of_the_shape() -> None:
    c = cluster((("a", "TOY", 1), ("b", "TOY", 1), ("c", "TOY", 1)), default_gbps=25,
                links=[{"between": ["a", "c"], "gbps": 1}])
    shapes = Shapes(c)
    assert shapes.group_shape(["a:0", "b:0"]) != shapes.group_shape(["a:0", "c:0"])


def test_nodes_without_gpus_are_tolerated() -> None:
    c = cluster((("a", "TOY", 2), ("b", "TOY", 2)))
    survivors = replace(c, gpus=tuple(g for g in c.gpus if g.node != "a"))
    shapes = Shapes(survivors)
    assert shapes.group_shape(["b:0"])[0] == ((shapes.node_class[1], 1),)
