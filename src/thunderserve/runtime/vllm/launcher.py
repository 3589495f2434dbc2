"""Local launcher of vLLM instances: one OS process (and its process group) per plan group.

Lifecycle of an instance: spawned in its own session (so its engine-core and worker children share its
process group) with a parent-death signal (it gets SIGTERM if we die) -> ready when GET /health answers 200
-> stopped by SIGTERM to the whole group, SIGKILL after a grace period. Ports are free ephemeral ones picked
by the caller, never fixed.

Supervision (`launch.supervisor.SupervisedLauncher`): `reap` collects an instance whose server process
exited, after SIGKILL to the rest of its process group (its engine-core and worker children would otherwise
live on, orphaned, holding memory and the NIXL port; the exited leader is collected only after that, so its
group id cannot be reused meanwhile); `kill` is SIGKILL to the group, as a crash would be (a later `reap`
collects it); `restart` starts the same `InstanceSpec` again (same ports, log appended) and waits until it
serves /health, and a restart that fails leaves no process behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import httpx

from thunderserve.runtime.launch.base import LaunchError, WorkerEndpoint
from thunderserve.runtime.vllm.instances import InstanceSpec, environment_for

DEFAULT_READY_TIMEOUT_S = 600.0
PR_SET_PDEATHSIG = 1


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports the OS reports free now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, loaded in this process (not in a forked child: a restart forks while other threads run,
    and a dlopen there could deadlock on a loader lock held by one of them)."""
    try:
        return cast(Callable[..., int], ctypes.CDLL("libc.so.6", use_errno=True).prctl)
    except OSError:
        return None


def _die_with_parent() -> None:  # runs in the child between fork and exec: only calls what `_prctl` loaded
    prctl = _prctl()
    if prctl is not None:
        with contextlib.suppress(Exception):
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class VllmLocalLauncher:
    """Starts vLLM instances as local processes and waits until each serves /health; restarts one on demand."""

    def __init__(self, log_dir: Path | None = None, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
                 device_count: int = 0, progress: Callable[[str], None] | None = None) -> None:
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.device_count = device_count
        self.progress = progress
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Path] = {}
        self._specs: dict[str, InstanceSpec] = {}  # as launched: a restart starts the same spec
        self._reaped: set[str] = set()  # groups whose current process `reap` already reported
        self._starting: set[str] = set()  # restarts under way: their own failure path collects them
        self._lock = threading.Lock()  # `stop` and a restart's spawn (restarts run on another thread)
        self._stopped = False  # set by `stop`: no instance starts after it, a restart under way gives up

    def start(self, specs: list[InstanceSpec]) -> dict[str, str]:
        """Start every instance, wait until all are ready; returns {group: base URL}. On failure everything
        started is stopped and LaunchError names the instance and the end of its log."""
        try:
            for spec in specs:
                self._spawn(spec)
            self._wait_ready(specs)
        except BaseException:
            self.stop()
            raise
        return {s.group_id: s.url for s in sorted(specs, key=lambda s: s.group_id)}

    def restart(self, group_id: str) -> WorkerEndpoint:
        """Start the group's instance again from the spec it was first launched with (its old process must have
        exited) and wait until it serves /health (blocking); on failure the new process group is gone too."""
        spec = self._specs[group_id]
        if self.is_running(group_id):
            raise LaunchError(f"vLLM instance of group {group_id} is still running; not restarting it")
        self._starting.add(group_id)
        try:
            self._spawn(spec)
            self._wait_ready([spec])
        except BaseException:
            proc = self._procs.get(group_id)
            if proc is not None:
                _signal_group(proc, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10.0)
                self._reaped.add(group_id)  # collected here: `reap` does not report it again
            raise
        finally:
            self._starting.discard(group_id)
        proc = self._procs[group_id]
        return WorkerEndpoint(group_id, spec.host, spec.port, spec.side_channel_port, proc.pid, 0, spec.node)

    def _spawn(self, spec: InstanceSpec) -> None:
        log_path = (self.log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"vllm-{spec.group_id}-{spec.port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        _prctl()  # loaded here, before the fork
        with self._lock:
            if self._stopped:
                raise LaunchError("the launcher is stopped")
            self._logs[spec.group_id] = log_path
            self._specs[spec.group_id] = spec
            with open(log_path, "ab") as log:  # appended: a restart keeps the dead instance's last words
                self._procs[spec.group_id] = subprocess.Popen(
                    list(spec.argv), env=environment_for(spec, device_count=self.device_count), stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                    preexec_fn=_die_with_parent)
            self._reaped.discard(spec.group_id)

    def _wait_ready(self, specs: list[InstanceSpec]) -> None:
        pending = {s.group_id: s for s in specs}
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while pending:
                for gid, spec in sorted(pending.items()):
                    proc = self._procs.get(gid)
                    if self._stopped or proc is None:
                        raise LaunchError(f"the launcher was stopped while vLLM instance {gid} started")
                    code = _exit_code(proc)
                    if code is not None:
                        raise LaunchError(f"vLLM instance of group {gid} exited with code {code} "
                                          f"before it was ready: {self.log_tail(gid)}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{spec.url}/health").status_code == 200:
                            del pending[gid]
                            if self.progress is not None:
                                self.progress(f"vLLM instance {gid} ready at {spec.url}")
                if pending and time.monotonic() > deadline:
                    raise LaunchError(f"vLLM instances not ready after {self.ready_timeout_s:g} s: "
                                      f"{sorted(pending)} (logs: {[str(self._logs[g]) for g in sorted(pending)]})")
                if pending:
                    time.sleep(0.5)

    def log_tail(self, group_id: str, lines: int = 5) -> str:
        """The last lines of an instance's log, on one line (for error messages)."""
        path = self._logs.get(group_id)
        if path is None or not path.exists():
            return "(no log)"
        tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(tail) + f" (log: {path})"

    def pids(self) -> dict[str, int]:
        """Process ids of the instances running now (not collecting any: that is `reap`'s job)."""
        return {g: p.pid for g, p in sorted(self._procs.items()) if _exit_code(p) is None}

    def worker_pids(self) -> dict[str, int]:
        return self.pids()

    def logs(self) -> Mapping[str, Path]:
        return dict(self._logs)

    # ---- supervision (launch.supervisor.SupervisedLauncher) ----------------------------------------------
    def reap(self) -> dict[str, int]:
        """Instances whose server process exited since the last call: {group: exit code}. The rest of each one's
        process group is killed first, then the leader is collected (no zombies, no orphans)."""
        dead = {}
        for gid, proc in sorted(self._procs.items()):
            if gid in self._reaped or gid in self._starting:
                continue
            collected = proc.returncode is not None  # then its group id may be reused: never signal it
            code = _exit_code(proc)
            if code is None:
                continue
            if not collected:
                _signal_group(proc, signal.SIGKILL)  # children that outlived it (engine core, TP workers)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)  # it has exited: this only collects it
            self._reaped.add(gid)
            dead[gid] = code
        return dead

    def is_running(self, group_id: str) -> bool:
        proc = self._procs.get(group_id)
        return proc is not None and _exit_code(proc) is None

    def kill(self, group_id: str) -> None:
        """SIGKILL an instance and its children, as a crash would (a later `reap` collects it)."""
        proc = self._procs.get(group_id)
        if proc is not None and proc.returncode is None:
            _signal_group(proc, signal.SIGKILL)

    # ---- stopping --------------------------------------------------------------------------------------
    def stop_one(self, group_id: str, timeout_s: float = 10.0) -> None:
        """Stop one instance (SIGTERM to its group, SIGKILL after `timeout_s`); idempotent."""
        proc = self._procs.pop(group_id, None)
        if proc is not None:
            _stop(proc, timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every instance (idempotent): no process of ours outlives this call, none starts after it."""
        with self._lock:
            self._stopped = True
            procs = list(self._procs.values())
            self._procs.clear()
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for p in procs:
            try:
                p.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)  # stragglers, and children that outlived their parent
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5.0)


def _exit_code(proc: subprocess.Popen[bytes]) -> int | None:
    """The process's exit code if it has exited, else None, without collecting it: while it is an uncollected
    zombie its pid (= its process group id) cannot be reused, so the group can still be signalled safely."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # collected elsewhere
        return proc.poll()
    if info is None:
        return None
    return -info.si_status if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else info.si_status


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass
    _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5.0)
