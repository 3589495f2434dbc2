"""Closing the loop: serve a plan on this machine, replay a workload, and simulate the same plan and requests with
the cost model calibrated on this machine's engine profile; print measured vs simulated TTFT/TPOT/throughput.

Steps (artifacts land in --out):
  1. profile the engine (`thunderserve profile`'s library call; --threads = serve's --cpu-threads) -> profile.json
  2. fit the CPU pseudo GPU type from it -> calibration.json; cluster.yaml = one node "local" with 2 such devices
  3. `thunderserve serve --demo` (1 prefill + 1 decode worker on this machine), wait until it answers
  4. `thunderserve bench-serve` at --rate for --duration (Poisson arrivals, trace lengths scaled to the caps)
  5. the same request schedule as a trace CSV -> `thunderserve simulate --trace --no-search` on cluster.yaml
  6. a table of measured vs simulated p50/p90 TTFT and TPOT and throughput (and the ratio)

    .venv/bin/python benchmarks/bench_fidelity_serve.py --model smollm2 --rate 0.5 --duration 60
    .venv/bin/python benchmarks/bench_fidelity_serve.py --model fake --quick      # the pipeline, no real model
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
import yaml
from rich.console import Console
from rich.table import Table

from thunderserve.costmodel.calibration import dump_calibration, fit_engine_profile, merge
from thunderserve.profiling.engine_profile import ProfileGrid
from thunderserve.profiling.run import run_profile
from thunderserve.profiling.schema import EngineProfile, dump_profile, load_profile
from thunderserve.runtime.api.loadgen import plan_requests
from thunderserve.runtime.launch.demo import demo_plan
from thunderserve.spec import load_workload
from thunderserve.spec.model import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "thunderserve"]
console = Console(stderr=True)
METRICS = [("p50_ttft_s", "p50 TTFT (ms)", 1e3), ("p90_ttft_s", "p90 TTFT (ms)", 1e3),
           ("p50_tpot_s", "p50 TPOT (ms)", 1e3), ("p90_tpot_s", "p90 TPOT (ms)", 1e3),
           ("throughput_rps", "throughput (req/s)", 1.0), ("throughput_tokens_s", "throughput (tok/s)", 1.0)]


def profile_step(args: argparse.Namespace, out: Path) -> EngineProfile:
    if args.profile:
        return load_profile(Path(args.profile))
    grid = (ProfileGrid(prefill_batch_sizes=(1, 2), prompt_tokens=(16, 64), decode_batch_sizes=(1, 4),
                        context_tokens=(32, 128), kv_tokens=(64,), warmup=1, repeats=2) if args.quick
            else ProfileGrid(prefill_batch_sizes=(1, 2, 4), prompt_tokens=(16, 64, 256),
                             decode_batch_sizes=(1, 2, 4, 8, 16), context_tokens=(64, 256), warmup=1, repeats=5))
    engine = spec = None
    if args.model.startswith("fake"):
        from thunderserve.cli.serve_cmds import FAKE_MODEL
        from thunderserve.runtime.fakes import FakeEngine

        engine, spec = FakeEngine(), FAKE_MODEL
    console.print(f"[1/5] profiling {args.model} ({args.cpu_threads} thread(s)) ...")
    prof = run_profile(args.model, "cpu", grid, engine=engine, model_spec=spec, threads=args.cpu_threads,
                       on_step=lambda label: console.print(f"      {label}", highlight=False))
    (out / "profile.json").write_text(dump_profile(prof))
    return prof


def write_inputs(prof: EngineProfile, out: Path) -> tuple[Path, Path, Path]:
    """calibration.json, cluster.yaml (2 calibrated devices on node 'local'), HF-style config.json of the model."""
    cpu = fit_engine_profile(prof.model, prof.device_spec(), prof.samples())
    (out / "calibration.json").write_text(dump_calibration(merge(None, [cpu], [str(out / "profile.json")])))
    console.print(f"[2/5] CPU fit: compute eff {cpu.spec.compute_efficiency:.3f}, memory eff "
                  f"{cpu.spec.memory_efficiency:.3f}, saturation {cpu.spec.compute_saturation_tokens:.1f} tokens, "
                  f"layer overhead {cpu.spec.layer_overhead_us:.0f} us; fit median error "
                  f"{cpu.errors.median_relative_error:.1%}")
    cluster = {"name": "local", "gpu_types": [cpu.spec.model_dump(mode="json")],
               "nodes": [{"name": "local", "gpu": cpu.spec.name, "count": 2}]}
    (out / "cluster.yaml").write_text(yaml.safe_dump(cluster, sort_keys=False))
    m: ModelSpec = prof.model
    dtype = {4: "float32", 2: "bfloat16"}.get(m.dtype_bytes, "float32")
    config = {"num_hidden_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_heads,
              "num_key_value_heads": m.num_kv_heads, "intermediate_size": m.intermediate_size,
              "vocab_size": m.vocab_size, "max_position_embeddings": m.max_context_tokens, "torch_dtype": dtype,
              "tie_word_embeddings": m.tie_word_embeddings}
    model_dir = out / m.name
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out / "calibration.json", out / "cluster.yaml", model_dir / "config.json"


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited early with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"serve did not answer within {timeout_s:.0f} s")


def serve_and_bench(args: argparse.Namespace, out: Path) -> dict[str, float]:
    url = f"http://127.0.0.1:{args.port}"
    log = (out / "serve.log").open("wb")
    proc = subprocess.Popen([*CLI, "serve", "--demo", "--model", args.model, "--port", str(args.port),
                             "--cpu-threads", str(args.cpu_threads), "--device", "cpu"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        console.print(f"[3/5] serving the demo plan on {url} ...")
        wait_ready(url, proc, args.ready_timeout)
        console.print(f"[4/5] bench-serve {args.workload} at {args.rate} req/s for {args.duration} s ...")
        res = subprocess.run([*CLI, "bench-serve", "--url", url, "--workload", args.workload, "--rate",
                              str(args.rate), "--duration", str(args.duration), "--seed", str(args.seed),
                              "--max-prompt-tokens", str(args.max_prompt_tokens), "--max-output-tokens",
                              str(args.max_output_tokens), "--json"], capture_output=True, text=True, cwd=ROOT)
        if res.returncode != 0:
            raise RuntimeError(f"bench-serve failed: {res.stderr.strip()}")
        return json.loads(res.stdout)  # type: ignore[no-any-return]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def simulate(args: argparse.Namespace, out: Path, cluster: Path, model_cfg: Path, prof: EngineProfile) -> dict:
    reqs = plan_requests(load_workload(args.workload), args.rate, args.duration, args.seed, args.max_prompt_tokens,
                         args.max_output_tokens)
    trace = out / "trace.csv"
    with trace.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        for r in reqs:
            w.writerow([f"{r.send_at_s:.6f}", r.prompt_tokens, r.output_tokens])
    plan = demo_plan(prof.model).model_copy(update={"model": prof.model.name})
    (out / "plan.json").write_text(plan.to_json())
    console.print(f"[5/5] simulating the same {len(reqs)} requests ...")
    res = subprocess.run([*CLI, "simulate", "--cluster", str(cluster), "--model", str(model_cfg), "--plan",
                          str(out / "plan.json"), "--trace", str(trace), "--no-search", "--duration",
                          str(args.duration + 1e-6), "--warmup", "0", "--ttft-ms", "1e6", "--tpot-ms", "1e6",
                          "--json"], capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"simulate failed: {res.stderr.strip()}")
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--profile", help="Reuse this profile.json instead of profiling")
    ap.add_argument("--workload", default="conversation")
    ap.add_argument("--rate", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--max-output-tokens", type=int, default=32)
    ap.add_argument("--cpu-threads", type=int, default=1)
    ap.add_argument("--port", type=int, default=8617)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--quick", action="store_true", help="Small profiling grid")
    ap.add_argument("--out", default="bench_fidelity_out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    prof = profile_step(args, out)
    _, cluster, model_cfg = write_inputs(prof, out)
    measured = serve_and_bench(args, out)
    simulated = simulate(args, out, cluster, model_cfg, prof)
    (out / "result.json").write_text(json.dumps({"measured": measured, "simulated": simulated}, indent=2))
    table = Table(title=f"{args.model}: served vs simulated ({args.workload}, {args.rate} req/s, {args.duration} s, "
                        f"{measured.get('num_requests')} requests)")
    for col in ("metric", "measured", "simulated", "sim / measured"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, label, scale in METRICS:
        m, s = measured.get(key), simulated.get(key)
        if m is None or s is None:
            table.add_row(label, str(m), str(s), "-")
            continue
        table.add_row(label, f"{m * scale:.3g}", f"{s * scale:.3g}", f"{s / m:.2f}" if m else "-")
    Console().print(table)
    if measured.get("num_failed"):
        console.print(f"warning: {measured['num_failed']} requests failed: {measured.get('errors')}")


if __name__ == "__main__":
    main()
