"""Tensor and pipeline parallelism across real processes (gloo on 127.0.0.1) give the TP=1/PP=1 tokens."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from engine_builders import engine_greedy

from thunderserve.runtime.engine import load_engine
from thunderserve.runtime.engine.parallel import ParallelLayout, spawn_greedy, split_layers

PROMPTS = [[5, 9, 14, 2, 77, 30, 31], [100], list(range(60, 80))]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def reference(tiny4_dir: Path) -> list[list[int]]:
    engine = load_engine(tiny4_dir)
    return [engine_greedy(engine, p, NEW_TOKENS) for p in PROMPTS]


def test_layout_and_layer_split() -> None:
    assert split_layers(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert split_layers(4, 2) == [(0, 2), (2, 4)]
    with pytest.raises(ValueError):
        split_layers(2, 3)
    layout = ParallelLayout(tp=2, pp=2)
    assert layout.world_size == 4 and layout.coords(3) == (1, 1) and layout.stage_ranks(1) == [2, 3]


class ThreadAllReduce:
    """An in-process all-reduce for TP shards running as threads (sums in rank order, like a fixed ring)."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n, timeout=30)
        self.parts: list[torch.Tensor | None] = [None] * n

    def for_rank(self, rank: int):  # type: ignore[no-untyped-def]
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack([p for p in self.parts if p is not None]).sum(0)
            self.barrier.wait()
            return t.copy_(total)

        return reduce


def test_tp_shards_in_threads_match_the_whole_model(tiny4_dir: Path, reference: list[list[int]]) -> None:
    """The TP math without processes: 2 shards (heads and MLP columns split) + a summing all-reduce."""
    reducer = ThreadAllReduce(2)
    shards = [load_engine(tiny4_dir, tp_rank=r, tp_size=2, all_reduce=reducer.for_rank(r)) for r in range(2)]
    whole = load_engine(tiny4_dir)
    assert shards[0].shape.num_heads == 2 and shards[0].shape.num_kv_heads == 1
    assert shards[1].weights.layers[0].gate_up.shape[0] == whole.weights.layers[0].gate_up.shape[0] // 2
    results: list[list[list[int]]] = [[], []]

    def run(rank: int) -> None:
        results[rank] = [engine_greedy(shards[rank], p, NEW_TOKENS) for p in PROMPTS]

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results[0] == results[1] == reference
    with pytest.raises(ValueError, match="does not divide"):
        load_engine(tiny4_dir, tp_rank=0, tp_size=3)


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_tp2_and_pp2_match_single_process(tiny4_dir: Path, reference: list[list[int]], tp: int, pp: int) -> None:
    assert spawn_greedy(tiny4_dir, tp=tp, pp=pp, prompts=PROMPTS, max_new_tokens=NEW_TOKENS,
                        timeout_s=240) == reference


@pytest.mark.slow
def test_tp2_times_pp2_matches_single_process(tiny4_dir: Path, reference: list[list[int]]) -> None:
    assert spawn_greedy(tiny4_dir, tp=2, pp=2, prompts=PROMPTS, max_new_tokens=NEW_TOKENS,
                        timeout_s=300) == reference
