"""Busy neighbours: the other workers of a local deployment, so the profiler can measure a device as deployed.

A CPU "device" of a deployment on one machine is one worker process; the plan's other workers run on the same
cores and memory bus, so a forward pass takes longer while they compute (shared cores under an OS scheduler,
shared caches and memory bandwidth; on a machine that other jobs also load, a smaller share of the CPU). A
profile taken alone misses that. `Neighbours` starts `count` processes that each load the same engine with the
same torch thread count and decode a batch back to back (what a busy decode worker does: `batch` sequences of
`context_tokens` context, restarted from the same prefix so the context stays bounded), and pauses (SIGSTOP) /
resumes (SIGCONT) them, so `engine_profile.profile_engine_shared` measures every shape alone and with the
neighbours busy a few seconds apart: both see the same background load of the machine. POSIX only.

Every neighbour exits when its parent goes away (checked between decode bursts), and `close` kills them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import signal
import time
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

from thunderserve.errors import ThunderServeError
from thunderserve.profiling.engine_profile import random_prompt

DEFAULT_READY_TIMEOUT_S = 300.0


def _build_engine(model_ref: str) -> Any:
    """The engine a neighbour runs: the runtime's fake for "fake[:context]", else the local CPU engine."""
    if model_ref == "fake" or model_ref.startswith("fake:"):
        from thunderserve.runtime.fakes import FakeEngine

        return FakeEngine()
    from thunderserve.runtime.engine import load_engine  # not via profiling.run, which imports this module

    return load_engine(model_ref, device="cpu")


def _neighbour_main(model_ref: str, threads: int, batch: int, context_tokens: int, ready: Any) -> None:
    """Body of a neighbour process: load, report ready, then decode back to back until the parent is gone."""
    import torch

    from thunderserve.runtime.engine.base import DecodeInput

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(max(1, threads))
    parent = os.getppid()
    try:
        engine = _build_engine(model_ref)
        prompt = random_prompt(random.Random(0), context_tokens, int(getattr(engine, "vocab_size", 256)))
        with torch.inference_mode():
            base = engine.prefill([prompt])[0].kv
    except BaseException as exc:  # noqa: BLE001 - the parent must see why the neighbour did not come up
        ready.put(f"error: {type(exc).__name__}: {exc}")
        return
    ready.put(os.getpid())
    with torch.inference_mode():
        while os.getppid() == parent:
            inputs = [DecodeInput(token_id=prompt[-1], kv=base.clone()) for _ in range(batch)]
            for _ in range(16):
                engine.decode(inputs)


class Neighbours:
    """`count` busy engine processes beside the profiler; paused until `set_busy(True)`."""

    def __init__(self, model_ref: str, count: int, threads: int, *, batch: int = 4, context_tokens: int = 128,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        if count < 0 or threads < 1 or batch < 1 or context_tokens < 1:
            raise ValueError("count must be >= 0; threads, batch and context_tokens >= 1")
        self.model_ref = model_ref
        self.count = count
        self.threads = threads
        self.batch = batch
        self.context_tokens = context_tokens
        self.ready_timeout_s = ready_timeout_s
        self._procs: list[BaseProcess] = []
        self._busy = False

    def start(self) -> None:
        """Spawn the neighbours and wait until each has loaded its engine; they start paused."""
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        for i in range(self.count):
            proc = ctx.Process(target=_neighbour_main, name=f"ts-profile-neighbour-{i}", daemon=True,
                               args=(self.model_ref, self.threads, self.batch, self.context_tokens, ready))
            proc.start()
            self._procs.append(proc)
        deadline = time.monotonic() + self.ready_timeout_s
        started = 0
        while started < self.count:
            try:
                msg = ready.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise ThunderServeError(f"profile neighbours did not load within {self.ready_timeout_s:.0f} s") \
                    from None
            if isinstance(msg, str):
                self.close()
                raise ThunderServeError(f"a profile neighbour failed to start ({msg.removeprefix('error: ')})")
            started += 1
        self._busy = True
        self.set_busy(False)

    def set_busy(self, busy: bool) -> None:
        """Resume (True) or pause (False) every neighbour; returns once each has stopped or continued."""
        if busy == self._busy:
            return
        sig, flag = (signal.SIGCONT, os.WCONTINUED) if busy else (signal.SIGSTOP, os.WUNTRACED)
        for proc in self._procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, sig)
                os.waitpid(proc.pid, flag)  # signals are asynchronous: wait for the state change itself
        self._busy = busy

    def close(self) -> None:
        for proc in self._procs:
            if proc.pid is not None and proc.is_alive():
                proc.kill()  # SIGKILL also ends a stopped process
        for proc in self._procs:
            proc.join(timeout=10)
        self._procs.clear()
        self._busy = False

    def __enter__(self) -> Neighbours:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
