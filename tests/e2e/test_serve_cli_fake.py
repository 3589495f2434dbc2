"""`thunderserve serve --demo --model fake` as a real subprocess: HTTP, processes, bench-serve, shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from thunderserve.runtime.fakes import FakeEngine

KEY = "sk-e2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


def start_server(port: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "thunderserve", "serve", "--demo", "--model", "fake", "--port", str(port), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early: {proc.stdout.read().decode() if proc.stdout else ''}")
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[bytes], str, list[int]]]:
    port = free_port()
    proc = start_server(port, "--api-key", KEY)
    url = f"http://127.0.0.1:{port}"
    pids: list[int] = []
    try:
        health = wait_healthy(proc, url)
        assert health["workers_alive"] == 2 and "pid" not in json.dumps(health)  # the open /health hides pids
        admin = httpx.get(f"{url}/admin/workers", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
        pids = [w["pid"] for w in admin]
        yield proc, url, pids
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for p in wait_gone(pids, 5):
            os.kill(p, signal.SIGKILL)


def test_serve_answers_openai_clients_and_shuts_down_cleanly(server) -> None:  # type: ignore[no-untyped-def]
    proc, url, pids = server
    assert len(pids) == 2 and all(pid_alive(p) for p in pids) and proc.pid not in pids
    ref = FakeEngine()
    client = openai.OpenAI(api_key=KEY, base_url=f"{url}/v1")
    c = client.completions.create(model="fake", prompt="hello there", max_tokens=8, temperature=0)
    assert c.choices[0].text == ref.decode_text(ref.greedy(list(b"hello there"), 8))
    assert c.usage.prompt_tokens == 11 and c.usage.completion_tokens == 8
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(
        model="fake", prompt="hello there", max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert streamed == c.choices[0].text
    chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0)
    ids = ref.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == ref.decode_text(ref.greedy(ids, 5))
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/admin/workers").status_code == 401

    bench = subprocess.run([sys.executable, "-m", "thunderserve", "bench-serve", "--url", url, "--api-key", KEY,
                            "--rate", "5", "--duration", "2", "--max-prompt-tokens", "16", "--max-output-tokens", "6",
                            "--ttft-ms", "5000", "--tpot-ms", "1000", "--json"],
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0, bench.stderr
    summary = json.loads(bench.stdout)
    assert summary["num_failed"] == 0 and summary["num_requests"] > 0
    assert summary["slo_attainment"] == 1.0 and summary["throughput_rps"] > 0
    for key in ("throughput_tokens_s", "p50_ttft_s", "p90_tpot_s", "p99_e2e_s"):
        assert summary[key] > 0

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert wait_gone(pids, 10) == []


def test_workers_exit_when_the_server_is_killed(server) -> None:  # type: ignore[no-untyped-def]
    proc, _, pids = server
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the workers' watchdog must notice
    proc.wait(10)
    assert wait_gone(pids, 10) == []
