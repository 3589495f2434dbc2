"""Engines on the demo plan: `serve --engine builtin` vs `serve --engine vllm` (1 prefill + 1 decode), and
vLLM P/D vs a single vLLM instance, on the same burst of concurrent chats (greedy, ignore_eos, same dtype).

Each system is started as its users start it (ours: `thunderserve serve`; the single instance: vLLM's own
OpenAI server from .venv-vllm), warmed with one request, then sent `--chats` chat completions at once, each
streaming `--max-tokens` tokens. Prints output tokens/s (all tokens / wall time of the burst), mean TTFT and
mean TPOT per system. On a shared CPU machine the figures are upper bounds on latency; compare ratios.

    .venv/bin/python benchmarks/bench_vllm.py --chats 16 --max-tokens 64
    .venv/bin/python benchmarks/bench_vllm.py --systems vllm,single --dtype bfloat16
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
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Tell me about the sea.", "Write a short poem about trees.", "Explain how a bicycle works.",
           "What do cats like to eat?", "Describe a sunny day in a city.", "Why is the sky blue?",
           "Give advice to a new student.", "What is a good breakfast?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(system: str, port: int, args: argparse.Namespace, tmp: str) -> subprocess.Popen[bytes]:
    vpy = str(ROOT / ".venv-vllm/bin/python")
    if system == "single":
        sys.path.insert(0, str(ROOT / "src"))
        from thunderserve.runtime.engine.loader import resolve_model_dir

        cmd = [vpy, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_dir("smollm2")),
               "--served-model-name", "smollm2-135m", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", args.dtype, "--enforce-eager", "--max-model-len", "1024"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": tmp,
               "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(args.cpu_threads)}
    else:
        cmd = [sys.executable, "-m", "thunderserve", "serve", "--demo", "--engine", system, "--port", str(port),
               "--cpu-threads", str(args.cpu_threads), "--no-resched"]
        if system == "vllm":
            cmd += ["--vllm-python", vpy, "--vllm-dtype", args.dtype, "--vllm-kv-cache-gib", "2",
                    "--vllm-max-model-len", "1024"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log = open(Path(tmp) / f"{system}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _wait(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 1200) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200 and \
                    httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready")


async def _one(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict[str, float]:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.0, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                tokens = int(data["usage"]["completion_tokens"])
            if first is None and any(c.get("delta", {}).get("content") for c in data.get("choices", ())):
                first = time.perf_counter()
    end = time.perf_counter()
    ttft = (first or end) - t0
    return {"tokens": tokens, "ttft_s": ttft, "tpot_s": (end - (first or end)) / max(tokens - 1, 1), "e2e_s": end - t0}


async def _burst(url: str, chats: int, max_tokens: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=3600) as client:
        await _one(client, url, "Hello!", 4)  # warm-up
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[_one(client, url, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(chats)])
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in rs)
    return {"chats": chats, "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "mean_ttft_s": sum(r["ttft_s"] for r in rs) / chats, "mean_tpot_s": sum(r["tpot_s"] for r in rs) / chats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="builtin,vllm,single", help="builtin, vllm (P/D), single (one vLLM)")
    ap.add_argument("--chats", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="vLLM dtype (the built-in engine runs float32)")
    ap.add_argument("--cpu-threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for system in args.systems.split(","):
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            proc = _start(system, port, args, tmp)
            try:
                t0 = time.perf_counter()
                _wait(url, proc)
                ready = time.perf_counter() - t0
                rows.append({"system": system, "ready_s": ready, **asyncio.run(_burst(url, args.chats,
                                                                                        args.max_tokens))})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"bench_vllm: demo plan, {args.chats} chats x {args.max_tokens} tokens, vLLM {args.dtype}")
    for c in ("system", "ready_s", "output_tokens", "wall_s", "tokens_per_s", "mean_ttft_s", "mean_tpot_s"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(r["system"], *[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                                     for c in ("ready_s", "output_tokens", "wall_s", "tokens_per_s", "mean_ttft_s",
                                               "mean_tpot_s")])
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
