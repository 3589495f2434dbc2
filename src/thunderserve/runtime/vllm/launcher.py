"""Local launcher of vLLM instances: one OS process (and its process group) per plan group.

Lifecycle of an instance: spawned in its own session (so its engine-core and worker children share its
process group) with a parent-death signal (it gets SIGTERM if we die) -> ready when GET /health answers 200
-> stopped by SIGTERM to the whole group, SIGKILL after a grace period. `kill(group)` is the chaos hook
(SIGKILL to the group, as a crash would). Ports are free ephemeral ones picked here, never fixed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import httpx

from thunderserve.runtime.launch.base import LaunchError
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


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class VllmLocalLauncher:
    """Starts vLLM instances as local processes and waits until each serves /health."""

    def __init__(self, log_dir: Path | None = None, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
                 device_count: int = 0, progress: Callable[[str], None] | None = None) -> None:
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.device_count = device_count
        self.progress = progress
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Path] = {}

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

    def _spawn(self, spec: InstanceSpec) -> None:
        log_path = (self.log_dir or Path(os.environ.get("TMPDIR", "/tmp"))) / f"vllm-{spec.group_id}-{spec.port}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._logs[spec.group_id] = log_path
        with open(log_path, "wb") as log:
            self._procs[spec.group_id] = subprocess.Popen(
                list(spec.argv), env=environment_for(spec, device_count=self.device_count), stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)

    def _wait_ready(self, specs: list[InstanceSpec]) -> None:
        pending = {s.group_id: s for s in specs}
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while pending:
                for gid, spec in sorted(pending.items()):
                    proc = self._procs[gid]
                    if proc.poll() is not None:
                        raise LaunchError(f"vLLM instance of group {gid} exited with code {proc.returncode} "
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
        return {g: p.pid for g, p in sorted(self._procs.items()) if p.poll() is None}

    def worker_pids(self) -> dict[str, int]:
        return self.pids()

    def logs(self) -> Mapping[str, Path]:
        return dict(self._logs)

    def kill(self, group_id: str) -> None:
        """SIGKILL an instance and its children (a crash, for chaos tests)."""
        proc = self._procs.get(group_id)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10.0)

    def stop_one(self, group_id: str, timeout_s: float = 10.0) -> None:
        """Stop one instance (SIGTERM to its group, SIGKILL after `timeout_s`); idempotent."""
        proc = self._procs.pop(group_id, None)
        if proc is not None:
            _stop(proc, timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every instance (idempotent): no process of ours outlives this call."""
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
