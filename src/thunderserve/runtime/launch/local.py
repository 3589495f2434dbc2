"""Local launcher: each worker is a process of this machine (multiprocessing "spawn" context).

No orphans: a worker exits when told to (`shutdown` / SIGTERM), and on its own when its parent dies (a
watchdog notices the re-parenting within half a second). Workers ignore SIGINT, so Ctrl-C in a terminal
reaches only the server, which then stops them in order. A tensor-parallel worker's follower ranks are its
own children: it reaps them when it stops, and they exit on their own when it dies (`workers.tensor_parallel`).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import signal
import time
import traceback
from multiprocessing.process import BaseProcess
from typing import Any

from thunderserve.runtime.launch.base import LaunchError, WorkerEndpoint
from thunderserve.runtime.workers.server import WorkerLaunchSpec, serve_worker

DEFAULT_READY_TIMEOUT_S = 300.0


def _worker_process(spec: WorkerLaunchSpec, ready: Any) -> None:
    """Body of a worker process: serve until stopped; report readiness or the load error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(serve_worker(spec, on_ready=ready.put))
    except BaseException as exc:  # noqa: BLE001 - the launcher must see why the worker did not come up
        with contextlib.suppress(Exception):
            ready.put({"group": spec.config.group_id, "error": f"{type(exc).__name__}: {exc}",
                       "traceback": traceback.format_exc()})
        raise SystemExit(1) from None


class LocalLauncher:
    """Spawns one process per worker spec and waits until each reports its ports."""

    def __init__(self, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        self.ready_timeout_s = ready_timeout_s
        self._ctx = mp.get_context("spawn")
        self._procs: dict[str, BaseProcess] = {}
        self._reaped: set[str] = set()

    def start(self, specs: list[WorkerLaunchSpec]) -> dict[str, WorkerEndpoint]:
        ready = self._ctx.Queue()
        for spec in specs:
            gid = spec.config.group_id
            proc = self._ctx.Process(target=_worker_process, args=(spec, ready), name=f"ts-worker-{gid}",
                                     daemon=False)
            proc.start()
            self._procs[gid] = proc
        endpoints: dict[str, WorkerEndpoint] = {}
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while len(endpoints) < len(specs):
                try:
                    info = ready.get(timeout=0.5)
                except queue.Empty:
                    dead = [g for g, p in self._procs.items() if g not in endpoints and p.exitcode is not None]
                    if dead:
                        raise LaunchError(f"worker {dead[0]} exited with code {self._procs[dead[0]].exitcode} "
                                          "before it was ready") from None
                    if time.monotonic() > deadline:
                        raise LaunchError(f"workers not ready after {self.ready_timeout_s:g} s: "
                                          f"{sorted(set(self._procs) - set(endpoints))}") from None
                    continue
                if "error" in info:
                    raise LaunchError(f"worker {info['group']} failed to start: {info['error']}")
                endpoints[info["group"]] = WorkerEndpoint(info["group"], info["host"], info["control_port"],
                                                          info["kv_port"], info["pid"], info["weights_token"])
        except BaseException:
            self.stop()
            raise
        finally:
            ready.close()
            ready.join_thread()
        return dict(sorted(endpoints.items()))

    def reap(self) -> dict[str, int]:
        """Collect workers that exited since the last call (no zombies): {group: exit code}."""
        dead = {}
        for gid, p in sorted(self._procs.items()):
            if gid not in self._reaped and p.exitcode is not None:  # exitcode polls waitpid: this reaps it
                self._reaped.add(gid)
                dead[gid] = int(p.exitcode)
        return dead

    def worker_pids(self) -> dict[str, int]:
        return {g: int(p.pid) for g, p in sorted(self._procs.items()) if p.pid is not None}

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every worker, wait, then SIGKILL stragglers; reap them all."""
        procs = list(self._procs.values())
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.1))
            if p.is_alive():
                p.kill()
                p.join(5.0)
        self._procs.clear()
