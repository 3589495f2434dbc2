"""Serving benchmark on this machine: disaggregated (1 prefill + 1 decode) vs colocated (2 colocated) workers.

Each layout is served by `thunderserve serve` (a subprocess) on the same model, then loaded with the same
Poisson schedule (`thunderserve.runtime.api.loadgen`, the simulator's arrival process and metric keys) at
each rate. Prints one table row per (layout, rate).

    .venv/bin/python benchmarks/bench_serve.py --model smollm2 --rates 0.5,1 --duration 20
    .venv/bin/python benchmarks/bench_serve.py --model fake --rates 5,10 --duration 5   # runtime overhead only
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

import httpx
from rich.console import Console
from rich.table import Table

from thunderserve.plan import Group, Phase, Plan, Routing, Stage
from thunderserve.runtime.api.loadgen import plan_requests, run_load, summarize
from thunderserve.spec import load_model, load_workload


def _layouts(model_name: str, num_layers: int) -> dict[str, Plan]:
    def group(gid: str, phase: Phase, gpu: str) -> Group:
        return Group(id=gid, phase=phase, stages=(Stage(gpus=(gpu,), layers=(0, num_layers)),))

    return {
        "1P+1D": Plan(model=model_name, cluster="local",
                      groups=(group("p0", Phase.PREFILL, "local:0"), group("d0", Phase.DECODE, "local:1")),
                      routing=Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}})),
        "2xColoc": Plan(model=model_name, cluster="local",
                        groups=(group("c0", Phase.COLOCATED, "local:0"), group("c1", Phase.COLOCATED, "local:1")),
                        routing=Routing(entry={"c0": 0.5, "c1": 0.5})),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(plan_path: Path, model: str, port: int, cpu_threads: int, engine: str = "builtin"
           ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "thunderserve", "serve", "--engine", engine, "--plan",
                             str(plan_path), "--model", model, "--port", str(port), "--cpu-threads", str(cpu_threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("server did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--workload", default="conversation")
    ap.add_argument("--rates", default="0.5,1")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-threads", type=int, default=1)
    ap.add_argument("--max-prompt-tokens", type=int, default=128)
    ap.add_argument("--max-output-tokens", type=int, default=32)
    ap.add_argument("--engine", default="builtin", help="builtin or vllm (thunderserve serve --engine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    if args.model.startswith("fake"):
        name, layers = "fake", 2
    else:
        spec = load_model("smollm2-135m" if args.model == "smollm2" else args.model)
        name, layers = spec.name, spec.num_layers
    workload = load_workload(args.workload)
    rates = [float(r) for r in args.rates.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, plan in _layouts(name, layers).items():
            plan_path = Path(tmp) / f"{label}.json"
            plan_path.write_text(plan.to_json())
            port = _free_port()
            proc = _serve(plan_path, args.model, port, args.cpu_threads, args.engine)
            try:
                for rate in rates:
                    reqs = plan_requests(workload, rate, args.duration, args.seed, args.max_prompt_tokens,
                                         args.max_output_tokens)
                    results, wall = asyncio.run(run_load(f"http://127.0.0.1:{port}", reqs, seed=args.seed))
                    rows.append({"layout": label, "rate_rps": rate, "wall_s": wall, **summarize(results)})
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"bench_serve: {args.model}, {args.workload}, {args.duration:g} s per rate, "
                        f"{args.cpu_threads} thread(s)/worker")
    cols = ["layout", "rate_rps", "num_requests", "num_failed", "throughput_rps", "throughput_tokens_s",
            "p50_ttft_s", "p99_ttft_s", "p50_tpot_s", "p99_tpot_s", "p50_e2e_s"]
    for c in cols:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(*[f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols])
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
