"""Local launcher: each worker is a process of this machine (multiprocessing "spawn" context).

A worker that died can be started again from the spec it was launched with (`restart`, used by
`launch.supervisor`); `reap` collects exited workers so none stays a zombie.

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
        self._specs: dict[str, WorkerLaunchSpec] = {}  # as launched: a restart starts the same spec
        self._stopped = False  # set by `stop`: a restart under way gives up, none starts after it

    def start(self, specs: list[WorkerLaunchSpec]) -> dict[str, WorkerEndpoint]:
        try:
            return self._launch(specs)
        except BaseException:
            self.stop()
            raise

    def restart(self, group_id: str) -> WorkerEndpoint:
        """Start the group's worker again from the spec it was first launched with (its old process must have
        exited and been reaped) and wait until it is ready; on failure the new process is gone too."""
        spec = self._specs[group_id]
        old = self._procs.get(group_id)
        if old is not None and old.exitcode is None:
            raise LaunchError(f"worker {group_id} is still running (pid {old.pid}); not restarting it")
        try:
            return self._launch([spec])[group_id]
        except BaseException:
            proc = self._procs.get(group_id)
            if proc is not None:
                if proc.is_alive():
                    proc.kill()
                proc.join(5.0)
                self._reaped.add(group_id)  # collected here: `reap` does not report it again
            raise

    def _launch(self, specs: list[WorkerLaunchSpec]) -> dict[str, WorkerEndpoint]:
        """Spawn one process per spec and wait until each reports its ports (LaunchError otherwise)."""
        if self._stopped:
            raise LaunchError("the launcher is stopped")
        ready = self._ctx.Queue()
        started: dict[str, BaseProcess] = {}
        for spec in specs:
            gid = spec.config.group_id
            proc = self._ctx.Process(target=_worker_process, args=(spec, ready), name=f"ts-worker-{gid}",
                                     daemon=False)
            proc.start()
            self._specs[gid] = spec
            self._procs[gid] = started[gid] = proc
            self._reaped.discard(gid)
        endpoints: dict[str, WorkerEndpoint] = {}
        deadline = time.monotonic() + self.ready_timeout_s
        try:
            while len(endpoints) < len(specs):
                try:
                    info = ready.get(timeout=0.5)
                except queue.Empty:
                    if self._stopped:
                        raise LaunchError("the launcher was stopped while workers started") from None
                    dead = [g for g, p in started.items() if g not in endpoints and p.exitcode is not None]
                    if dead:
                        raise LaunchError(f"worker {dead[0]} exited with code {started[dead[0]].exitcode} "
                                          "before it was ready") from None
                    if time.monotonic() > deadline:
                        raise LaunchError(f"workers not ready after {self.ready_timeout_s:g} s: "
                                          f"{sorted(set(started) - set(endpoints))}") from None
                    continue
                if "error" in info:
                    raise LaunchError(f"worker {info['group']} failed to start: {info['error']}")
                endpoints[info["group"]] = WorkerEndpoint(info["group"], info["host"], info["control_port"],
                                                          info["kv_port"], info["pid"], info["weights_token"])
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

    def is_running(self, group_id: str) -> bool:
        proc = self._procs.get(group_id)
        return proc is not None and proc.exitcode is None

    def kill(self, group_id: str) -> None:
        """SIGKILL the group's worker now (a later `reap` collects it)."""
        proc = self._procs.get(group_id)
        if proc is not None and proc.exitcode is None:
            proc.kill()

    def worker_pids(self) -> dict[str, int]:
        return {g: int(p.pid) for g, p in sorted(self._procs.items()) if p.pid is not None}

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every worker, wait, then SIGKILL stragglers; reap them all."""
        self._stopped = True
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
