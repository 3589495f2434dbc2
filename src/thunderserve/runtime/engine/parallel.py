"""Tensor- and pipeline-parallel execution over torch.distributed: rank layout, activation hand-off, a driver.

Layout of a tp x pp deployment over world ranks: rank = stage * tp + tp_rank. Stage s holds the layers
`split_layers(num_layers, pp)[s]`; its tp ranks form one TP group (heads and MLP columns split, all-reduce
after o_proj and down_proj; see `engine.model`). After each all-reduce every TP rank of a stage holds the same
hidden states, so TP rank r of stage s talks only to TP rank r of stages s-1 and s+1 (no broadcast needed).
The last stage's ranks send the sampled tokens back to the first stage's.

`pipeline_greedy` runs greedy generation for a batch of prompts through such a deployment (one micro-batch,
no overlap: a correctness driver, not a scheduler); `spawn_greedy` starts tp*pp local processes (gloo on
127.0.0.1) to run it and returns the tokens, cleaning the processes up on every path.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thunderserve.runtime.engine.base import DecodeInput, KVCache

_META_LEN = 8  # int64 slots of the shape header sent before each tensor: [ndim, dims...]


def split_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous, balanced [start, end) layer ranges for pp stages (earlier stages take the remainder)."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers into {pp} stages")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        end = start + base + (1 if s < extra else 0)
        out.append((start, end))
        start = end
    return out


@dataclass(frozen=True)
class ParallelLayout:
    """tp x pp ranks: rank = stage * tp + tp_rank."""

    tp: int
    pp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(stage, tp_rank) of a world rank."""
        return divmod(rank, self.tp)

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank(stage, r) for r in range(self.tp)]


def init_tp_groups(layout: ParallelLayout, rank: int) -> Any:
    """Create every stage's TP group (a collective: all ranks call it) and return this rank's (None if tp == 1)."""
    import torch.distributed as dist

    if layout.tp == 1:
        return None
    mine = None
    for stage in range(layout.pp):
        group = dist.new_group(layout.stage_ranks(stage))
        if rank in layout.stage_ranks(stage):
            mine = group
    return mine


def send_tensor(t: torch.Tensor, dst: int) -> None:
    """Send a tensor of any shape (<= 7 dims): its shape first, then the data."""
    import torch.distributed as dist

    meta = torch.zeros(_META_LEN, dtype=torch.int64)
    meta[0] = t.dim()
    meta[1:1 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.send(meta, dst)
    dist.send(t.contiguous(), dst)


def recv_tensor(src: int, dtype: torch.dtype) -> torch.Tensor:
    import torch.distributed as dist

    meta = torch.zeros(_META_LEN, dtype=torch.int64)
    dist.recv(meta, src)
    shape = [int(v) for v in meta[1:1 + int(meta[0])]]
    out = torch.empty(shape, dtype=dtype)
    dist.recv(out, src)
    return out


def pipeline_greedy(engine: Any, layout: ParallelLayout, rank: int, prompts: list[list[int]] | None,
                    max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens for `prompts` through the stage `engine` holds; first-stage ranks return them, others [].

    Every rank of the deployment calls this; only first-stage ranks need `prompts`.
    """
    stage, tp_rank = layout.coords(rank)
    first, last = stage == 0, stage == layout.pp - 1
    prev = layout.rank(stage - 1, tp_rank) if not first else -1
    nxt = layout.rank(stage + 1, tp_rank) if not last else -1
    head, tail = layout.rank(0, tp_rank), layout.rank(layout.pp - 1, tp_rank)
    dtype = engine.dtype

    def run(hidden_or_ids: Any, kvs: list[KVCache] | None) -> tuple[list[torch.Tensor], list[KVCache]]:
        if kvs is None:
            res = engine.prefill(hidden_or_ids) if first else engine.prefill_hidden(hidden_or_ids)
            return [r.logits for r in res], [r.kv for r in res]
        if first:
            return engine.decode([DecodeInput(int(t), kv) for t, kv in zip(hidden_or_ids, kvs, strict=True)]), kvs
        return engine.decode_hidden(hidden_or_ids, kvs), kvs

    kvs: list[KVCache] | None = None
    tokens: list[list[int]] = []
    step_input: Any = prompts
    for step in range(max_new_tokens):
        if not first:  # hidden states of every new token, packed, with per-sequence lengths
            lengths = [int(n) for n in recv_tensor(prev, torch.int64)]
            packed = recv_tensor(prev, dtype)
            step_input = list(packed.split(lengths)) if kvs is None else packed
        outs, kvs = run(step_input, kvs)
        if not last:
            send_tensor(torch.tensor([o.shape[0] for o in outs], dtype=torch.int64), nxt)
            send_tensor(torch.cat(outs), nxt)
            new = None
        else:
            new = torch.stack([o.argmax() for o in outs]).to(torch.int64)
            if not first:
                send_tensor(new, head)
        if first:
            if not last:
                new = recv_tensor(tail, torch.int64)
            assert new is not None
            if step == 0:
                tokens = [[] for _ in outs]
            for seq, t in zip(tokens, new.tolist(), strict=True):
                seq.append(int(t))
            step_input = new.tolist()
    return tokens if first else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _greedy_worker(rank: int, world: int, port: int, tp: int, pp: int, model: str, prompts: list[list[int]],
                   max_new_tokens: int, result_path: str) -> None:
    """Body of one spawned rank: join the group, load its shard, run the pipeline, write rank 0's tokens."""
    import torch.distributed as dist

    from thunderserve.runtime.engine.loader import load_engine, resolve_model_dir
    from thunderserve.runtime.engine.weights import read_hf_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        layout = ParallelLayout(tp=tp, pp=pp)
        stage, tp_rank = layout.coords(rank)
        num_layers = int(read_hf_config(resolve_model_dir(model))["num_hidden_layers"])
        start, end = split_layers(num_layers, pp)[stage]
        group = init_tp_groups(layout, rank)
        engine = load_engine(model, first_layer=start, end_layer=end, tp_rank=tp_rank, tp_size=tp, tp_group=group)
        tokens = pipeline_greedy(engine, layout, rank, prompts if stage == 0 else None, max_new_tokens)
        if rank == 0:
            tmp = result_path + ".tmp"
            Path(tmp).write_text(json.dumps(tokens))
            os.replace(tmp, result_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_greedy(model: str | Path, tp: int, pp: int, prompts: list[list[int]], max_new_tokens: int,
                 timeout_s: float = 180.0) -> list[list[int]]:
    """Run `pipeline_greedy` on tp*pp local processes (gloo); kill them all on error or timeout."""
    import torch.multiprocessing as mp

    layout = ParallelLayout(tp=tp, pp=pp)
    with tempfile.TemporaryDirectory(prefix="ts-parallel-") as tmp:
        result = str(Path(tmp) / "tokens.json")
        ctx = mp.start_processes(_greedy_worker, nprocs=layout.world_size, join=False, start_method="spawn",
                                 args=(layout.world_size, free_port(), tp, pp, str(model), prompts,
                                       max_new_tokens, result))
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tp={tp} pp={pp} greedy run did not finish in {timeout_s} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(10)
        return [list(map(int, seq)) for seq in json.loads(Path(result).read_text())]
