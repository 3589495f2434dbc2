"""Chaos: `kill -9` a decode worker of a live 2 prefill + 2 decode deployment (tiny random Llama, local
processes) in the middle of 40 concurrent streams. Every stream must finish with exactly its tokens (the
same as a run without the kill, greedy), and shutting down must leave no process behind. Then, either:
- with supervision (the default), the dead worker is restarted and re-admitted to the same group and role
  and serves requests again within 60 s of its death, the plan unchanged; or
- with `--no-restart-workers`, the controller drops the dead group and /admin/plan shows the plan without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_serve_cli_fake import free_port, pid_alive, wait_gone, wait_healthy
from tiny_llama import build_tiny_llama

pytestmark = pytest.mark.slow
if not hasattr(pytest.importorskip("thunderserve.runtime.engine"), "load_engine"):
    pytest.skip("the model engine (runtime.engine.load_engine) is not in this tree", allow_module_level=True)
KEY = "sk-chaos"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = "the cat ran far away once upon a time tell me a story hello world good day".split()
NUM_REQUESTS = 40


# ---- helpers (test_flip uses them too) ------------------------------------------------------------------
def pd_plan_json(num_prefill: int, num_decode: int) -> dict[str, Any]:
    """p0.. prefill and d0.. decode, one local device each, equal shares (the tiny model has 2 layers)."""
    pre = [f"p{i}" for i in range(num_prefill)]
    dec = [f"d{i}" for i in range(num_decode)]
    groups = [{"id": g, "phase": "prefill" if g in pre else "decode",
               "stages": [{"gpus": [f"local:{k}"], "layers": [0, 2]}]} for k, g in enumerate(pre + dec)]
    return {"format": "thunderserve.plan/v1", "model": "tiny-llama", "cluster": "local",
            "kv_transfer": {"compression": "none"}, "groups": groups,
            "routing": {"entry": {p: 1 / len(pre) for p in pre},
                        "kv": {p: {d: 1 / len(dec) for d in dec} for p in pre}}}


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    url: str
    model_dir: Path

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.url}{path}", headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def workers(self) -> dict[str, dict[str, Any]]:
        return {w["group_id"]: w for w in self.get("/admin/workers")["data"]}


@contextlib.contextmanager
def serve_plan(plan: dict[str, Any], tmp: Path, model_dir: Path, *extra: str) -> Iterator[Served]:
    """`thunderserve serve` on the plan as a subprocess (own session); killed with its group at the end."""
    plan_path = tmp / "plan.json"
    plan_path.write_text(json.dumps(plan))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "thunderserve", "serve", "--engine", "builtin", "--plan", str(plan_path), "--model",
                             str(model_dir), "--port", str(port), "--api-key", KEY, "--cpu-threads", "1", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    pids: list[int] = []
    try:
        wait_healthy(proc, url, timeout_s=240)
        served = Served(proc, url, model_dir)
        pids = [w["pid"] for w in served.workers().values()]
        yield served
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for p in wait_gone(pids, 5):
            os.kill(p, signal.SIGKILL)


@dataclass
class Stream:
    """One streamed completion as the client saw it."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    done: bool = False
    status: int = 0


def request_body(i: int) -> dict[str, Any]:
    prompt = " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(3 + i % 5))
    return {"model": "tiny-llama", "prompt": prompt, "max_tokens": 16 + i % 17, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any], out: Stream) -> Stream:
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as r:
        out.status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                out.done = True
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                out.errors.append(chunk["error"]["message"])
                continue
            choice = chunk["choices"][0]
            out.token_ids += choice.get("token_ids") or []
            out.text += choice["text"]
            out.finish_reason = choice["finish_reason"] or out.finish_reason
    return out


async def run_streams(url: str, bodies: list[dict[str, Any]],
                      during: Callable[[list[Stream]], Awaitable[Any]] | None = None) -> tuple[list[Stream], Any]:
    """All bodies streamed concurrently; `during(streams)` runs alongside (e.g. kills a worker)."""
    streams = [Stream() for _ in bodies]
    limits = httpx.Limits(max_connections=len(bodies) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        tasks = [asyncio.create_task(stream_one(client, url, b, s)) for b, s in zip(bodies, streams, strict=True)]
        side = await during(streams) if during is not None else None
        await asyncio.gather(*tasks)
    return streams, side


def assert_exact(streams: list[Stream], bodies: list[dict[str, Any]], reference: list[Stream] | None) -> None:
    for i, (s, b) in enumerate(zip(streams, bodies, strict=True)):
        assert s.status == 200 and s.done and not s.errors, (i, s)
        assert s.finish_reason == "length" and len(s.token_ids) == b["max_tokens"], (i, s)
        if reference is not None:
            assert s.token_ids == reference[i].token_ids and s.text == reference[i].text, i


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# ---- the test -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@dataclass(frozen=True)
class Kill:
    victim: str
    pid: int
    delivered_at_kill: int  # tokens the clients had when it was killed
    unfinished_at_kill: int  # streams not done then
    killed_s: float  # time.monotonic() of the kill (system-wide: comparable with the server's clock)
    chaos_s: float  # the 40 streams' wall time


def kill_a_decoder_under_load(srv: Served, bodies: list[dict[str, Any]], reference: list[Stream]) -> Kill:
    """Stream every body and kill -9 the busiest decode worker once decoding is under way; every stream must
    still end with exactly the reference's tokens (nothing lost, nothing twice)."""

    async def kill_when_decoding(streams: list[Stream]) -> tuple[str, int, int, int, float] | None:
        """kill -9 a decode worker as soon as decoding is under way (the busiest by the router's count)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        async with httpx.AsyncClient(timeout=30) as c:
            while loop.time() < deadline and not all(s.done for s in streams):
                await asyncio.sleep(0.01)
                if sum(1 for s in streams if len(s.token_ids) >= 2) < 4:
                    continue
                workers = (await c.get(f"{srv.url}/admin/workers", headers=AUTH)).json()["data"]
                # the router's own count of requests placed on each decode worker (a heartbeat's
                # running_decode can be stale on a loaded machine: the kill might then hit an idle worker)
                held = {w["group_id"]: w["held_requests"] for w in workers if w["role"] == "decode"}
                victim = max(sorted(held), key=lambda g: held[g])
                if held[victim] < 2:
                    continue
                pid = next(w["pid"] for w in workers if w["group_id"] == victim)
                os.kill(pid, signal.SIGKILL)
                killed_s = time.monotonic()
                unfinished = sum(1 for s in streams if not s.done)
                return victim, pid, sum(len(s.token_ids) for s in streams), unfinished, killed_s
        return None

    t0 = time.monotonic()
    streams, killed = asyncio.run(run_streams(srv.url, bodies, kill_when_decoding))
    chaos_s = time.monotonic() - t0
    assert killed is not None, "the streams ended before a decode worker could be killed"
    kill = Kill(*killed, chaos_s=chaos_s)
    assert 0 < kill.delivered_at_kill < sum(b["max_tokens"] for b in bodies) and kill.unfinished_at_kill > 0
    assert_exact(streams, bodies, reference)  # nothing lost, nothing twice, same tokens as without the kill
    assert srv.get("/admin/resched")["retries_total"] > 0  # the kill did hit requests in flight
    return kill


def start_and_reference(srv: Served, bodies: list[dict[str, Any]]) -> tuple[list[Stream], dict[str, Any]]:
    reference, _ = asyncio.run(run_streams(srv.url, bodies))
    assert_exact(reference, bodies, None)
    before = srv.workers()
    assert {g: w["role"] for g, w in before.items()} == {"p0": "prefill", "p1": "prefill", "d0": "decode",
                                                         "d1": "decode"}
    return reference, before


def stop_cleanly(srv: Served, pids: list[int]) -> None:
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0
    assert wait_gone(pids, 10) == []


def test_kill_a_decode_worker_mid_stream_it_is_restarted_and_serves_again(model_dir: Path, tmp_path: Path) -> None:
    bodies = [request_body(i) for i in range(NUM_REQUESTS)]
    with serve_plan(pd_plan_json(2, 2), tmp_path, model_dir) as srv:
        reference, before = start_and_reference(srv, bodies)
        plan_before = srv.get("/admin/plan")
        kill = kill_a_decoder_under_load(srv, bodies, reference)
        victim = kill.victim

        def served_again() -> bool:
            """The victim is back (a new process, re-admitted) and has generated tokens; runs a few streams
            through the deployment whenever it is back but has not served yet."""
            w = srv.workers()[victim]
            if w["health"] != "ok":
                return False
            if (w["state"] or {}).get("generated_tokens_total", 0) > 0:
                return True
            again, _ = asyncio.run(run_streams(srv.url, bodies[:8]))
            assert_exact(again, bodies[:8], reference[:8])
            return False

        wait_until(served_again, max(60.0 - (time.monotonic() - kill.killed_s), 0.0),
                   f"{victim} to serve again within 60 s of its death")
        serve_again_s = time.monotonic() - kill.killed_s
        after = srv.workers()
        w = after[victim]
        assert w["restarts"] == 1 and w["pid"] != kill.pid and w["role"] == "decode" and w["weights_loads"] == 2
        assert not os.path.exists(f"/proc/{kill.pid}")  # the dead one was reaped (no zombie)
        for g, other in after.items():  # the others: same processes, weights loaded once
            if g != victim:
                assert other["alive"] and other["pid"] == before[g]["pid"] and other["weights_loads"] == 1
        plan = srv.get("/admin/plan")
        assert plan["groups"] == plan_before["groups"] and plan["routing"] == plan_before["routing"]
        status = srv.get("/admin/resched")
        assert not [r for r in status["history"] if r["cause"].startswith("fail:")]  # no re-plan around it
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
        assert f'thunderserve_worker_restarts_total{{group="{victim}"}} 1.0' in metrics
        again, _ = asyncio.run(run_streams(srv.url, bodies))  # the whole plan serves, the same tokens
        assert_exact(again, bodies, reference)
        print(f"\nchaos (supervised): killed {victim} (pid {kill.pid}) after {kill.delivered_at_kill} tokens, "
              f"{kill.unfinished_at_kill} streams unfinished; 40 streams in {kill.chaos_s:.1f} s; restarted as "
              f"pid {w['pid']}, serving again {serve_again_s:.1f} s after the kill; "
              f"{status['retries_total']} retries")
        stop_cleanly(srv, [o["pid"] for o in after.values()])


def test_kill_a_decode_worker_mid_stream_unsupervised_the_plan_drops_it(model_dir: Path, tmp_path: Path) -> None:
    bodies = [request_body(i) for i in range(NUM_REQUESTS)]
    with serve_plan(pd_plan_json(2, 2), tmp_path, model_dir, "--no-restart-workers") as srv:
        reference, before = start_and_reference(srv, bodies)
        kill = kill_a_decoder_under_load(srv, bodies, reference)
        victim = kill.victim

        def dropped() -> bool:
            plan = srv.get("/admin/plan")
            return victim not in {g["id"] for g in plan["groups"]}

        wait_until(dropped, 30, f"the controller to drop {victim}")
        plan = srv.get("/admin/plan")
        assert victim not in json.dumps(plan["routing"])
        assert {g["id"] for g in plan["groups"]} == {"p0", "p1", "d0", "d1"} - {victim}
        assert plan["routing"]["entry"] and abs(sum(plan["routing"]["entry"].values()) - 1) < 1e-6
        status = srv.get("/admin/resched")
        first = status["history"][0]
        assert first["cause"] == f"fail:{victim}" and first["path"] == "lightweight"
        react_s = first["decided_at_s"] - kill.killed_s
        assert 0 <= react_s < 15.0  # detected (connection loss) and decided within a few controller ticks
        assert any(a["kind"] == "drop" and a["group"] == victim and a["status"] == "applied"
                   for a in first["actions"])
        after = srv.workers()
        assert after[victim]["health"] == "removed" and not after[victim]["alive"] and after[victim]["restarts"] == 0
        for g, w in after.items():  # survivors: same processes, weights loaded once, maybe flipped
            if g != victim:
                assert w["alive"] and w["pid"] == before[g]["pid"] and w["weights_loads"] == 1
                assert w["weights_token"] == before[g]["weights_token"]

        wait_until(lambda: not os.path.exists(f"/proc/{kill.pid}"), 10, f"the server to reap {victim} (no zombie)")
        again, _ = asyncio.run(run_streams(srv.url, bodies[:8]))  # the new plan serves
        assert_exact(again, bodies[:8], reference[:8])
        print(f"\nchaos: killed {victim} (pid {kill.pid}) after {kill.delivered_at_kill} tokens, "
              f"{kill.unfinished_at_kill} streams unfinished; 40 streams in {kill.chaos_s:.1f} s; kill -> decision "
              f"{react_s:.2f} s, re-plan {first['decision_time_s'] * 1e3:.0f} ms; "
              f"{status['retries_total']} retries; new plan {[(g['id'], g['phase']) for g in plan['groups']]}")
        stop_cleanly(srv, [w["pid"] for w in after.values()])
        assert not pid_alive(kill.pid)
