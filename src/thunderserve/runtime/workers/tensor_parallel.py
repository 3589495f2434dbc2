"""Tensor parallelism inside a served group: the worker process is TP rank 0 and drives tp-1 follower processes.

Every rank loads only its shard of the group's weights (query/kv heads and MLP columns; see `engine.weights`)
for every pipeline stage of the group, so rank r holds TP shard r of the whole (possibly pipelined) group and
the ranks form one torch.distributed world (gloo over 127.0.0.1; NCCL when every rank has its own CUDA
devices, with a gloo side group for the control tensors). `TensorParallelEngine` implements `EngineProtocol`
on rank 0: each engine call is sent to the followers over a pipe first, then run locally, so all ranks run
the same forward and meet in the same all-reduces; every follower acknowledges each command.

KV caches. Each rank keeps its own head shard of a request's cache, under a handle rank 0 assigns. Towards
the worker a request's cache is a `TensorParallelKV` whose `keys`/`values` gather the shards into the
full-head layout the KV transfer ships; a cache imported from elsewhere (full heads) is scattered by heads
to the ranks before its first decode step. When the worker drops a cache, its handle is released on the
followers with the next command.

Cleanup. Followers are daemonic children of the worker: `close` (worker stop) tells them to stop and reaps
them; if the worker dies (even kill -9) a watchdog thread in each follower sees the re-parenting within half
a second and exits, and a follower blocked in a collective gets a connection error. A follower failing on
its own (not the same input error rank 0 saw) marks the engine broken: every later call raises.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from thunderserve.runtime.engine.base import DecodeInput, EngineProtocol, KVCache, PrefillResult

log = logging.getLogger("thunderserve.worker.tp")

DEFAULT_TIMEOUT_S = 120.0  # loading, joining the group, and one collective
StageDevices = tuple[tuple[int, int | None, str], ...]  # (first_layer, end_layer or None: all, device) per stage


@dataclass(frozen=True)
class TpSpec:
    """What every rank of a tensor-parallel group loads (picklable)."""

    model: str
    tp: int
    rank_stages: tuple[StageDevices, ...]  # [tp rank] -> its stages (same layer ranges, own devices)
    cpu_threads: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.tp < 2 or len(self.rank_stages) != self.tp:
            raise ValueError(f"tensor parallel degree {self.tp} needs one stage list per rank, got "
                             f"{len(self.rank_stages)}")

    @property
    def backend(self) -> str:
        """NCCL when every rank has its own CUDA devices; gloo otherwise (CPU, or ranks sharing a device)."""
        devices = [[d for _, _, d in stages] for stages in self.rank_stages]
        cuda = all(d.startswith("cuda") for ds in devices for d in ds)
        distinct = all(len({ds[s] for ds in devices}) == self.tp for s in range(len(devices[0])))
        return "nccl" if cuda and distinct and torch.cuda.is_available() else "gloo"


def tp_spec(model: str, tp: int, device: str = "cpu", stages: Sequence[tuple[int, int, str]] = (),
            rank_devices: Sequence[Sequence[str]] = (), cpu_threads: int = 1,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> TpSpec:
    """A `TpSpec` from a worker's launch fields: `stages` as for a pipeline (empty: one stage of all layers on
    `device`), `rank_devices[rank][stage]` each rank's devices (empty: every rank uses rank 0's)."""
    bounds: list[tuple[int, int | None]] = [(a, b) for a, b, _ in stages] or [(0, None)]
    own = [d for _, _, d in stages] or [device]
    devices = [list(d) for d in rank_devices] or [own] * tp
    if len(devices) != tp or any(len(d) != len(bounds) for d in devices):
        raise ValueError(f"rank_devices must name {len(bounds)} device(s) for each of {tp} ranks")
    rank_stages = tuple(tuple((a, b, d) for (a, b), d in zip(bounds, ds, strict=True)) for ds in devices)
    return TpSpec(model=model, tp=tp, rank_stages=rank_stages, cpu_threads=cpu_threads, timeout_s=timeout_s)


def load_rank_engine(spec: TpSpec, rank: int) -> EngineProtocol:
    """Rank `rank`'s shard of the group: one stage engine, or a pipeline of them (all-reduce over the world)."""
    from thunderserve.runtime.engine import load_engine

    stages = spec.rank_stages[rank]
    if len(stages) == 1:
        first, end, device = stages[0]
        return load_engine(spec.model, device=device, first_layer=first, end_layer=end, tp_rank=rank,
                           tp_size=spec.tp)
    from thunderserve.runtime.workers.pipeline import PipelineEngine

    return PipelineEngine([load_engine(spec.model, device=d, first_layer=a, end_layer=b, tp_rank=rank,
                                       tp_size=spec.tp) for a, b, d in stages])


# ---- KV shards on the wire (byte views: gloo has no bfloat16) ------------------------------------------
def _pack(kv: KVCache) -> torch.Tensor:
    """keys and values of a cache as one CPU byte tensor [2, layers, heads, tokens, head_dim * itemsize]."""
    both = torch.stack([kv.keys, kv.values]).to("cpu").contiguous()
    return both.view(torch.uint8)


def _unpack(data: torch.Tensor, dtype: torch.dtype, first_layer: int) -> KVCache:
    both = data.view(dtype)
    return KVCache(keys=both[0], values=both[1], first_layer=first_layer)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _init_group(spec: TpSpec, rank: int, store: Any) -> Any:
    """Join the TP world; return the group control tensors travel on (gloo, on CPU)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=spec.timeout_s)
    dist.init_process_group(spec.backend, store=store, rank=rank, world_size=spec.tp, timeout=timeout)
    return dist.new_group(backend="gloo", timeout=timeout) if spec.backend != "gloo" else None


# ---- follower process ----------------------------------------------------------------------------------
def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)  # rank 0 is gone: no orphans, even when blocked inside a collective


def _follower_main(spec: TpSpec, rank: int, conn: Connection, store_port: int, parent_pid: int) -> None:
    """Body of follower rank `rank`: load the shard, join the group, run rank 0's commands until told to stop."""
    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="ts-tp-watchdog").start()
    torch.set_num_threads(max(1, spec.cpu_threads))
    try:
        engine = load_rank_engine(spec, rank)
    except Exception as exc:  # noqa: BLE001 - rank 0 reports it as the worker's load error
        conn.send(("error", f"tensor-parallel rank {rank} failed to load: {type(exc).__name__}: {exc}"))
        return
    conn.send(("loaded", int(engine.weights_token)))
    store = dist.TCPStore("127.0.0.1", store_port, spec.tp, False,
                          timeout=datetime.timedelta(seconds=spec.timeout_s))
    control = _init_group(spec, rank, store)
    caches: dict[int, KVCache] = {}
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return  # rank 0 closed the pipe
            kind, args, release = msg[0], msg[1], msg[2]
            for h in release:
                caches.pop(h, None)
            if kind == "stop":
                return
            try:
                reply = _follow(engine, caches, kind, args, control)
            except ValueError as exc:  # an input error every rank raises before any collective
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                continue
            except Exception as exc:  # noqa: BLE001 - out of step with rank 0: report and leave
                conn.send(("fatal", f"rank {rank}: {type(exc).__name__}: {exc}"))
                return
            conn.send(("ok", reply))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _follow(engine: Any, caches: dict[int, KVCache], kind: str, args: Any, control: Any) -> Any:
    """Run one rank-0 command on this follower's shard."""
    import torch.distributed as dist

    if kind == "prefill":
        handles, prompts = args
        results = engine.prefill(prompts)
        for h, r in zip(handles, results, strict=True):
            caches[h] = r.kv
        return None
    if kind == "decode":
        handles, tokens = args
        engine.decode([DecodeInput(int(t), caches[h]) for h, t in zip(handles, tokens, strict=True)])
        return None
    if kind == "import":
        handle, shape, dtype, first_layer = args
        out = torch.empty(shape, dtype=torch.uint8)
        dist.scatter(out, None, src=0, group=control)
        caches[handle] = _unpack(out, getattr(torch, dtype), first_layer)
        return None
    if kind == "gather":
        dist.gather(_pack(caches[args]), None, dst=0, group=control)
        return None
    if kind == "cached":
        return sorted(caches)
    if kind == "weights":
        return int(engine.weights_token)
    raise ValueError(f"unknown tensor-parallel command {kind!r}")


# ---- rank 0 --------------------------------------------------------------------------------------------
class TensorParallelKV(KVCache):
    """A request's cache on a TP group: rank 0's head shard plus the handle of the other ranks' shards.

    `keys`/`values` gather all ranks' heads (a collective: read them on the worker's compute thread).
    """

    def __init__(self, engine: TensorParallelEngine, handle: int, local: KVCache) -> None:  # noqa: D107
        self.engine = engine
        self.handle = handle
        self.local = local
        self.first_layer = local.first_layer
        self.buffer = None
        self._full: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.local.num_tokens
        if self._full is None or self._full[0] != n:
            keys, values = self.engine.gather(self)
            self._full = (n, keys, values)
        return self._full[1], self._full[2]

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        return self._gathered()[0]

    @property
    def values(self) -> torch.Tensor:  # type: ignore[override]
        return self._gathered()[1]

    @property
    def num_tokens(self) -> int:
        return self.local.num_tokens

    def __repr__(self) -> str:  # never gather just to print
        return f"TensorParallelKV(handle={self.handle}, tokens={self.num_tokens}, first_layer={self.first_layer})"


class TensorParallelEngine:
    """`EngineProtocol` over tp ranks: rank 0 computes here, followers in their own processes (see module doc)."""

    def __init__(self, spec: TpSpec, local: EngineProtocol, procs: list[BaseProcess], conns: list[Connection],
                 follower_tokens: list[int], control: Any) -> None:
        self.spec = spec
        self.local = local
        self._procs = procs
        self._conns = conns
        self._control = control
        self._handles = itertools.count(1)
        self._release: list[int] = []  # handles whose caches the worker dropped (sent with the next command)
        self._release_lock = threading.Lock()
        self._imported: dict[int, TensorParallelKV] = {}  # id(foreign full-head cache) -> its scattered shards
        self._broken: str | None = None
        self._closed = False
        self.rank_weights_tokens = (int(local.weights_token), *follower_tokens)
        self._weights_token = hash(self.rank_weights_tokens) & ((1 << 63) - 1)
        atexit.register(self.close)

    # ---- facts and text (rank 0's) --------------------------------------------------------------------
    @property
    def broken(self) -> str | None:
        """Why the group can no longer compute (a rank died or fell out of step), or None while it can."""
        return self._broken

    @property
    def tp(self) -> int:
        return self.spec.tp

    @property
    def weights_token(self) -> int:
        return self._weights_token

    @property
    def max_context_tokens(self) -> int:
        return self.local.max_context_tokens

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.local.eos_token_ids

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.local, "vocab_size", None)

    @property
    def follower_pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs if p.pid is not None]

    def encode(self, text: str) -> list[int]:
        return self.local.encode(text)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self.local.decode_text(token_ids)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.local.apply_chat_template(messages)

    # ---- compute --------------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        handles = [next(self._handles) for _ in prompts]
        results = self._collective("prefill", (handles, [list(map(int, p)) for p in prompts]),
                                   lambda: self.local.prefill(prompts))
        return [PrefillResult(logits=r.logits, kv=self._wrap(h, r.kv)) for h, r in zip(handles, results, strict=True)]

    def decode(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]:
        caches = [self._shards(inp.kv) for inp in inputs]
        tokens = [int(inp.token_id) for inp in inputs]
        return self._collective("decode", ([c.handle for c in caches], tokens), lambda: self.local.decode(
            [DecodeInput(t, c.local) for t, c in zip(tokens, caches, strict=True)]))

    def gather(self, kv: TensorParallelKV) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks' head shards of a cache, concatenated in rank order (the full-head layout)."""
        import torch.distributed as dist

        local = kv.local
        mine = _pack(local)
        parts = [torch.empty_like(mine) for _ in range(self.tp)]
        self._collective("gather", kv.handle, lambda: dist.gather(mine, parts, dst=0, group=self._control))
        full = _unpack(torch.cat(parts, dim=2), local.keys.dtype, local.first_layer)
        dev = local.keys.device
        return full.keys.to(dev), full.values.to(dev)

    def cached_handles(self) -> list[list[int]]:
        """Per follower, the handles of the caches it holds (for tests and leak checks)."""
        return self._collective("cached", None, lambda: None, replies=True)

    def current_weights_tokens(self) -> tuple[int, ...]:
        """Every rank's `weights_token` as it is now (equal to `rank_weights_tokens`: no rank ever reloads)."""
        followers = self._collective("weights", None, lambda: None, replies=True)
        return (int(self.local.weights_token), *map(int, followers))

    # ---- caches ---------------------------------------------------------------------------------------
    def _wrap(self, handle: int, local: KVCache) -> TensorParallelKV:
        kv = TensorParallelKV(self, handle, local)
        weakref.finalize(kv, self._drop, handle)
        return kv

    def _drop(self, handle: int) -> None:
        with self._release_lock:
            self._release.append(handle)

    def _shards(self, kv: KVCache) -> TensorParallelKV:
        """This engine's sharded cache for `kv`: itself, or (a full-head cache from elsewhere) its scatter."""
        if isinstance(kv, TensorParallelKV) and kv.engine is self:
            return kv
        key = id(kv)
        if key not in self._imported:
            self._imported[key] = self._scatter(kv)
            weakref.finalize(kv, self._imported.pop, key, None)
        return self._imported[key]

    def _scatter(self, kv: KVCache) -> TensorParallelKV:
        import torch.distributed as dist

        heads = int(kv.keys.shape[1])
        if heads % self.tp:
            raise ValueError(f"KV cache has {heads} kv heads, not divisible by tensor parallel degree {self.tp}")
        dtype = kv.keys.dtype
        chunks = [_pack(KVCache(keys=k, values=v, first_layer=kv.first_layer))
                  for k, v in zip(kv.keys.chunk(self.tp, dim=1), kv.values.chunk(self.tp, dim=1), strict=True)]
        handle = next(self._handles)
        mine = torch.empty_like(chunks[0])
        self._collective("import", (handle, tuple(chunks[0].shape), _dtype_name(dtype), kv.first_layer),
                         lambda: dist.scatter(mine, chunks, src=0, group=self._control))
        local = _unpack(mine, dtype, kv.first_layer)
        device = kv.keys.device
        return self._wrap(handle, KVCache(keys=local.keys.to(device), values=local.values.to(device),
                                          first_layer=kv.first_layer))

    # ---- the command protocol -------------------------------------------------------------------------
    def _collective(self, kind: str, args: Any, run_local: Any, replies: bool = False) -> Any:
        """Send a command to every follower, run rank 0's part, collect the acks; raise if ranks disagree."""
        if self._closed or self._broken is not None:
            raise RuntimeError(f"tensor-parallel group is down: {self._broken or 'closed'}")
        with self._release_lock:
            release, self._release = self._release, []
        try:
            for conn in self._conns:
                conn.send((kind, args, release))
        except (OSError, ValueError) as exc:
            self._fail(f"cannot reach a follower rank: {exc}")
        local_error: Exception | None = None
        out = None
        try:
            out = run_local()
        except Exception as exc:  # noqa: BLE001 - compared with the followers' outcome below
            local_error = exc
        acks = [self._ack(r + 1, conn) for r, conn in enumerate(self._conns)]
        errors = [a for a in acks if a[0] != "ok"]
        if local_error is not None and isinstance(local_error, ValueError) and len(errors) == len(acks) \
                and all(a[0] == "error" for a in errors):
            raise local_error  # the same input error on every rank: the group is still in step
        if local_error is not None or errors:
            detail = "; ".join([*(str(a[1]) for a in errors),
                                *([f"rank 0: {local_error!r}"] if local_error is not None else [])])
            self._fail(f"{kind} failed: {detail}")
        return [a[1] for a in acks] if replies else out

    def _ack(self, rank: int, conn: Connection) -> tuple[str, Any]:
        deadline = time.monotonic() + self.spec.timeout_s
        while True:
            try:
                if conn.poll(0.2):
                    reply: tuple[str, Any] = conn.recv()
                    return reply
            except (EOFError, OSError):
                return ("fatal", f"rank {rank} exited")
            proc = self._procs[rank - 1]
            if not proc.is_alive():
                return ("fatal", f"rank {rank} exited with code {proc.exitcode}")
            if time.monotonic() > deadline:
                return ("fatal", f"rank {rank} did not answer in {self.spec.timeout_s:g} s")

    def _fail(self, reason: str) -> None:
        self._broken = reason
        log.error("tensor-parallel group broken: %s", reason)
        self.close()
        raise RuntimeError(f"tensor-parallel group is down: {reason}")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop and reap the followers, leave the process group (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for conn in self._conns:
            with contextlib.suppress(Exception):
                conn.send(("stop", None, []))
        _reap(self._procs, timeout_s)
        for conn in self._conns:
            conn.close()
        _leave_group()


def _reap(procs: Sequence[BaseProcess], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(deadline - time.monotonic(), 0.1))
        if p.is_alive():
            p.kill()
            p.join(5.0)


def _leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def start_tp_engine(spec: TpSpec) -> TensorParallelEngine:
    """Spawn the followers, load rank 0's shard here, join the group; on any failure no process is left."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group (one TP group per worker)")
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    store = dist.TCPStore("127.0.0.1", 0, spec.tp, True, timeout=timeout, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs: list[BaseProcess] = []
    conns: list[Connection] = []
    try:
        for rank in range(1, spec.tp):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_follower_main, args=(spec, rank, child, store.port, os.getpid()),
                               name=f"ts-tp-rank{rank}", daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        local = load_rank_engine(spec, 0)
        tokens = []
        for rank, conn in enumerate(conns, start=1):
            deadline = time.monotonic() + spec.timeout_s
            while not conn.poll(0.2):
                if not procs[rank - 1].is_alive():
                    raise RuntimeError(f"tensor-parallel rank {rank} exited with code {procs[rank - 1].exitcode} "
                                       "while loading")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"tensor-parallel rank {rank} not loaded after {spec.timeout_s:g} s")
            kind, value = conn.recv()
            if kind != "loaded":
                raise RuntimeError(str(value))
            tokens.append(int(value))
        control = _init_group(spec, 0, store)
        return TensorParallelEngine(spec, local, procs, conns, tokens, control)
    except BaseException:
        for conn in conns:
            conn.close()
        for p in procs:
            if p.is_alive():
                p.kill()
        _reap(procs, 1.0)
        _leave_group()
        raise
