"""Hostile and unlucky inputs against a live server: every case gets a clear answer, the server keeps serving,
and no state leaks (the router's pending gauge returns to 0).

Starts `thunderserve serve --demo` (a subprocess, two workers), then runs each case of the issue-14 probe: bad
and huge bodies, deep JSON, unsupported parameters, client disconnects, garbage on the workers' control and KV
ports, admin paths outside the allowed folder, a burst past the queue bound. After each case a normal request
must succeed and the pending gauge must read 0. Prints one row per case.

    .venv/bin/python benchmarks/bench_hostile.py                 # fake engine (runtime behaviour only)
    .venv/bin/python benchmarks/bench_hostile.py --model smollm2 # the real small model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from thunderserve.runtime.kv.transport import MAGIC, encode_frame

Case = Callable[["Probe"], Awaitable[str]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Probe:
    def __init__(self, url: str, model: str) -> None:
        self.url = url
        self.model = model
        self.http = httpx.AsyncClient(base_url=url, timeout=120)

    async def post(self, path: str, **kw: object) -> httpx.Response:
        return await self.http.post(path, **kw)  # type: ignore[arg-type]

    def body(self, **extra: object) -> dict[str, object]:
        return {"model": self.model, "prompt": "hello", "max_tokens": 4, **extra}

    async def pending(self) -> float:
        text = (await self.http.get("/metrics")).text
        line = next(x for x in text.splitlines() if x.startswith("thunderserve_router_pending_requests "))
        return float(line.split()[1])

    async def workers(self) -> list[dict[str, object]]:
        return list((await self.http.get("/admin/workers")).json()["data"])


def _answer(r: httpx.Response) -> str:
    try:
        code = r.json().get("error", {}).get("code")
    except (json.JSONDecodeError, AttributeError):
        code = None
    return f"{r.status_code} {code or ''}".strip()


async def raw_post(p: Probe, body: bytes) -> str:
    return _answer(await p.post("/v1/completions", content=body, headers={"content-type": "application/json"}))


def _nested(depth: int) -> object:
    v: object = []
    for _ in range(depth):
        v = [v]
    return v


async def _disconnect(p: Probe, stream: bool) -> str:
    async def go() -> None:
        async with httpx.AsyncClient(base_url=p.url, timeout=120) as c:
            await c.post("/v1/completions", json=p.body(prompt="long", max_tokens=400, stream=stream))

    task = asyncio.create_task(go())
    await asyncio.sleep(1.0)
    task.cancel()
    for _ in range(100):
        if await p.pending() == 0:
            return "cancelled"
        await asyncio.sleep(0.1)
    return "still pending"


async def _port_garbage(p: Probe, which: str) -> str:
    w = next(x for x in await p.workers() if x["role"] == "decode")
    port = int(w["control_port"] if which == "control" else w["kv_port"])  # type: ignore[call-overload]
    reader, writer = await asyncio.open_connection(str(w["host"]), port)
    if which == "control":
        writer.write(encode_frame({"type": "shutdown"}))  # the public frame format, without the handshake
    else:
        writer.write(struct.pack(">4sIQI", MAGIC, 10, 64 * 1024**3, 0))  # announces 64 GiB
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 30)  # the challenge, then the worker hangs up
    writer.close()
    after = next(x for x in await p.workers() if x["group_id"] == w["group_id"])
    return f"closed after {len(data)} B; worker {'alive' if after['alive'] else 'DOWN'}"


async def _admin(p: Probe, event: str) -> str:
    r = await p.post("/admin/replan", json={"event": event})
    leaked = any(s in r.text for s in ("root:", "localhost", "\\u0000"))
    return _answer(r) + (" LEAKS CONTENT" if leaked else "")


async def _burst(p: Probe, n: int) -> str:
    limits = httpx.Limits(max_connections=n)  # all n at once (the default pool would queue them client-side)
    async with httpx.AsyncClient(base_url=p.url, timeout=120, limits=limits) as c:
        rs = await asyncio.gather(*(c.post("/v1/completions", json=p.body(max_tokens=16)) for _ in range(n)))
    counts: dict[int, int] = {}
    for r in rs:
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
    retry = {r.headers.get("retry-after") for r in rs if r.status_code == 429}
    return ", ".join(f"{k}x{v}" for k, v in sorted(counts.items())) + (f" (Retry-After {retry})" if retry else "")


def cases() -> list[tuple[str, Case]]:
    return [
        ("not JSON", lambda p: raw_post(p, b"{nope")),
        ("JSON nested 100,000 deep", lambda p: raw_post(p, b"[" * 100_000 + b"]" * 100_000)),
        ("JSON nested 40 deep", lambda p: raw_post(p, json.dumps(p.body(x=_nested(40))).encode())),
        ("20 MiB body", lambda p: raw_post(p, json.dumps(p.body(prompt="a" * (20 << 20))).encode())),
        ("6 MB prompt", lambda p: raw_post(p, json.dumps(p.body(prompt="a" * 6_000_000)).encode())),
        ("lone surrogate", lambda p: raw_post(p, b'{"model": "%s", "prompt": "\\ud800"}' % p.model.encode())),
        ("content null", _chat_null),
        ("logit_bias", lambda p: raw_post(p, json.dumps(p.body(logit_bias={"1": 5})).encode())),
        ("max_tokens 10^9", lambda p: raw_post(p, json.dumps(p.body(max_tokens=10**9)).encode())),
        ("disconnect (non-streaming)", lambda p: _disconnect(p, False)),
        ("disconnect (streaming)", lambda p: _disconnect(p, True)),
        ("shutdown frame on a control port", lambda p: _port_garbage(p, "control")),
        ("64 GiB header on a KV port", lambda p: _port_garbage(p, "kv")),
        ("admin workload:/dev/zero", lambda p: _admin(p, "workload:/dev/zero")),
        ("admin workload:/etc/passwd", lambda p: _admin(p, "workload:/etc/passwd")),
        ("admin add:../../etc/hosts", lambda p: _admin(p, "add:../../etc/hosts")),
        ("admin file in folder, bad CSV", lambda p: _admin(p, "workload:secret.csv")),
        ("burst of 300 (queue bound 32)", lambda p: _burst(p, 300)),
    ]


async def _chat_null(p: Probe) -> str:
    return _answer(await p.post("/v1/chat/completions", json={"model": p.model,
                                                              "messages": [{"role": "user", "content": None}]}))


async def run(url: str, model: str) -> list[tuple[str, str, str, float, float]]:
    p = Probe(url, model)
    rows = []
    for name, case in cases():
        t0 = time.perf_counter()
        try:
            answer = await case(p)
        except Exception as exc:  # noqa: BLE001 - a case that breaks the probe is a row, not a crash
            answer = f"probe error {type(exc).__name__}: {exc}"[:80]
        seconds = time.perf_counter() - t0
        ok = await p.post("/v1/completions", json=p.body())
        pending = -1.0
        for _ in range(100):
            pending = await p.pending()
            if pending == 0:
                break
            await asyncio.sleep(0.1)
        rows.append((name, answer, "yes" if ok.status_code == 200 else f"NO ({ok.status_code})", pending, seconds))
    await p.http.aclose()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fake", help="fake (default) or smollm2")
    args = ap.parse_args()
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "secret.csv").write_text("root:x:0:0:secret\n")
        proc = subprocess.Popen([sys.executable, "-m", "thunderserve", "serve", "--demo", "--model", args.model,
                                 "--port", str(port), "--admin-files-dir", str(folder), "--max-queued-requests",
                                 "32"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise SystemExit(f"server exited with {proc.returncode}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            rows = asyncio.run(run(url, model))
            alive = proc.poll() is None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
    table = Table(title=f"hostile inputs against serve --demo --model {args.model} (server alive at end: {alive})")
    for col in ("case", "answer", "served after", "pending after", "case s"):
        table.add_column(col, justify="right" if col in ("pending after", "case s") else "left")
    for name, answer, served, pending, seconds in rows:
        table.add_row(name, answer, served, f"{pending:g}", f"{seconds:.2f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
