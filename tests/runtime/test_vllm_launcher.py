"""`VllmLocalLauncher` under supervision, with real processes: a stand-in instance (fake_vllm_instance.py, an HTTP
server answering /health, with a child in its process group as vLLM's engine core is) is killed -9, reaped
(no zombie, its orphaned child killed too), restarted from the same spec at the same port, killed again; a
restart that fails leaves no process behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from runtime_builders import pid_alive, wait_gone

from thunderserve.runtime.launch.base import LaunchError
from thunderserve.runtime.vllm.instances import InstanceSpec
from thunderserve.runtime.vllm.launcher import VllmLocalLauncher, free_ports

FAKE = Path(__file__).resolve().parent / "fake_vllm_instance.py"


def fake_spec(tmp: Path, *extra: str) -> InstanceSpec:
    (port,) = free_ports(1)
    argv = (sys.executable, str(FAKE), "--host", "127.0.0.1", "--port", str(port),
            "--child-pid-file", str(tmp / "child.pid"), *extra)
    return InstanceSpec("d0", "n0", argv, {}, "127.0.0.1", port, 0)


def child_pid(tmp: Path) -> int:
    return int((tmp / "child.pid").read_text())


def reaped(launcher: VllmLocalLauncher, timeout_s: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while not (out := launcher.reap()):
        assert time.monotonic() < deadline, "the killed instance was never reaped"
        time.sleep(0.05)
    return out


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[VllmLocalLauncher]:
    launcher = VllmLocalLauncher(log_dir=tmp_path, ready_timeout_s=60)
    try:
        yield launcher
    finally:
        launcher.stop()


def test_killed_instance_is_reaped_with_its_children_and_restarted_from_the_same_spec(
        launcher: VllmLocalLauncher, tmp_path: Path) -> None:
    spec = fake_spec(tmp_path)
    urls = launcher.start([spec])
    first, child = launcher.pids()["d0"], child_pid(tmp_path)
    assert launcher.is_running("d0") and pid_alive(child) and launcher.reap() == {}

    os.kill(first, signal.SIGKILL)  # kill -9 of the server process only, as a crash would
    assert reaped(launcher) == {"d0": -9}
    assert not pid_alive(first)  # collected: no zombie
    assert wait_gone([child], 10) == []  # its orphaned child went with it
    assert not launcher.is_running("d0") and launcher.pids() == {} and launcher.reap() == {}  # reported once

    endpoint = launcher.restart("d0")
    second = launcher.pids()["d0"]
    assert second != first and endpoint.pid == second and launcher.is_running("d0")
    assert (endpoint.host, endpoint.control_port) == ("127.0.0.1", spec.port)  # the same spec, the same port
    assert httpx.get(f"{urls['d0']}/health", timeout=5).status_code == 200
    assert "fake instance serving" in launcher.log_tail("d0")

    launcher.kill("d0")  # the supervisor's kill: SIGKILL to the group, collected by the next reap
    assert reaped(launcher) == {"d0": -9}
    assert not pid_alive(second) and wait_gone([child_pid(tmp_path)], 10) == []


def test_a_restart_that_fails_leaves_no_process_behind(launcher: VllmLocalLauncher, tmp_path: Path) -> None:
    flag = tmp_path / "refuse"
    launcher.start([fake_spec(tmp_path, "--fail-if-exists", str(flag))])
    with pytest.raises(LaunchError, match="still running"):
        launcher.restart("d0")  # not while it runs
    launcher.kill("d0")
    assert reaped(launcher) == {"d0": -9}

    flag.touch()
    with pytest.raises(LaunchError, match=r"exited with code 3 before it was ready: .*refusing to start"):
        launcher.restart("d0")
    assert launcher.pids() == {} and launcher.reap() == {}  # collected by restart itself, reported by nobody
    assert wait_gone([child_pid(tmp_path)], 10) == []  # the failed start's child was killed with it

    flag.unlink()
    launcher.restart("d0")  # the next try works
    assert launcher.is_running("d0")
    launcher.stop()
    with pytest.raises(LaunchError, match="stopped"):
        launcher.restart("d0")
    assert launcher.pids() == {}
