"""`serve --demo --model fake` (processes, the CLI as a user runs it): kill -9 of the decode worker is followed by a
new process re-admitted into d0 (same role, plan unchanged) that decodes again, and shutting down leaves no process
behind; with `--no-restart-workers` the dead worker stays dead (the controller re-plans without it)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from test_serve_cli_fake import KEY, free_port, pid_alive, start_server, wait_gone, wait_healthy

from thunderserve.runtime.fakes import FakeEngine

pytestmark = pytest.mark.slow  # 25-40 s each on a loaded 2-core box (processes, a restart)
AUTH = {"Authorization": f"Bearer {KEY}"}


def _workers(url: str) -> dict[str, dict[str, Any]]:
    return {w["group_id"]: w for w in httpx.get(f"{url}/admin/workers", headers=AUTH, timeout=30).json()["data"]}


def _complete(url: str, prompt: str) -> str:
    r = httpx.post(f"{url}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "fake", "prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def _until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _serve(*extra: str) -> tuple[Any, str]:
    port = free_port()
    proc = start_server(port, "--api-key", KEY, *extra)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def test_kill_9_of_a_worker_is_followed_by_a_restart_that_serves_again() -> None:
    proc, url = _serve()
    pids: list[int] = []
    try:
        before = _workers(url)
        pids = [w["pid"] for w in before.values()]
        plan = httpx.get(f"{url}/admin/plan", headers=AUTH, timeout=30).json()
        os.kill(before["d0"]["pid"], signal.SIGKILL)
        _until(lambda: _workers(url)["d0"]["health"] == "ok" and _workers(url)["d0"]["restarts"] == 1, 60,
               "d0 restarted and re-admitted")
        d0 = _workers(url)["d0"]
        pids.append(d0["pid"])
        assert d0["pid"] != before["d0"]["pid"] and d0["role"] == "decode" and not pid_alive(before["d0"]["pid"])
        ref = FakeEngine()
        assert _complete(url, "after the kill") == ref.decode_text(ref.greedy(list(b"after the kill"), 6))
        _until(lambda: (_workers(url)["d0"]["state"] or {}).get("generated_tokens_total", 0) > 0, 30,
               "the new d0 to decode")
        assert httpx.get(f"{url}/admin/plan", headers=AUTH, timeout=30).json() == plan
        assert 'thunderserve_worker_restarts_total{group="d0"} 1.0' in httpx.get(f"{url}/metrics", timeout=30).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert wait_gone(pids, 10) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_no_restart_workers_leaves_a_dead_worker_dead() -> None:
    proc, url = _serve("--no-restart-workers")
    try:
        before = _workers(url)
        os.kill(before["d0"]["pid"], signal.SIGKILL)
        _until(lambda: _workers(url)["d0"]["health"] in ("down", "removed"), 30, "d0 seen dead")
        _until(lambda: not pid_alive(before["d0"]["pid"]), 10, "d0 reaped")
        ref = FakeEngine()
        assert _complete(url, "still serving") == ref.decode_text(ref.greedy(list(b"still serving"), 6))
        d0 = _workers(url)["d0"]
        assert d0["restarts"] == 0 and not d0["alive"] and d0["pid"] == before["d0"]["pid"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
