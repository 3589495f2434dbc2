"""Closing the loop: serve a plan on this machine, replay a workload, and simulate the same plan and requests with
the cost model calibrated on this machine's engine profile; print measured vs simulated TTFT/TPOT/throughput.

Steps (artifacts land in --out):
  1. profile the engine (`thunderserve profile`'s library call, --threads = the workers' --cpu-threads): every
     shape alone and next to --neighbours busy engine processes (the plan's other worker on this machine,
     `profiling.neighbours`), plus the KV path between workers (codec + runtime transport over loopback TCP)
  2. serve the demo plan (1 prefill + 1 decode worker on this machine) with re-scheduling off, so the
     deployment stays the plan that is simulated (`serve --demo` lets the controller flip both workers to
     colocated when it sees a "workload shift"), and wait until it answers
  3. replay the bench-serve load (`runtime.api.loadgen`: Poisson arrivals, trace lengths scaled to the caps),
     keeping every request's client-side TTFT/TPOT
  4. profile again and pool both sessions' samples (-> profile.json): the machine is shared, and the medians
     should see the same background load as the served run
  5. fit the CPU pseudo GPU type (-> calibration.json, cluster.yaml: 2 such devices on node "local", linked at
     the measured KV path bandwidth) to each shape's latency expected at the neighbour's busy fraction (from the
     simulated run itself, iterated to a fixed point: `profiling.contention`), and simulate the same request
     schedule with the plan (`sim.replay.simulate`), twice (-> sim_profile/, sim_served_share/):
       a. "profile": the profile's wall-clock latencies (pooled over both sessions);
       b. "served CPU share": the profile's CPU seconds per pass at the share of a core the served workers got
          while busy (sampled from /proc during the replay). Other jobs load this 2-core machine and the share a
          process gets moves 2x within minutes (see the printed shares), so (a) mixes the model's error with
          that drift; (b) takes the drift out by measuring it (an input about the machine, not a latency).
  6. a table of measured vs simulated mean/p50/p90 TTFT and TPOT and throughput, each with the ratio and
     PASS/FAIL against --tolerance (the done-when is on the means), the machine's load average
     (os.getloadavg) around each phase, the CPU shares, and the serving stack's round trip (not modelled).

    .venv/bin/python benchmarks/bench_fidelity_serve.py --model smollm2 --rate 0.5 --duration 60
    .venv/bin/python benchmarks/bench_fidelity_serve.py --model fake --quick      # the pipeline, no real model
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table

from thunderserve.costmodel.calibration import dump_calibration, fit_engine_profile, merge
from thunderserve.costmodel.fit import PassKind
from thunderserve.plan import group_perf_of
from thunderserve.profiling.contention import neighbour_busy, worker_utilisation
from thunderserve.profiling.engine_profile import ProfileGrid
from thunderserve.profiling.run import run_profile
from thunderserve.profiling.schema import EngineProfile, dump_profile, load_profile, pool_profiles
from thunderserve.runtime.api.loadgen import RequestResult, plan_requests, run_load
from thunderserve.runtime.launch.demo import demo_plan
from thunderserve.sim.config import SimConfig
from thunderserve.sim.replay import SimResult, simulate
from thunderserve.spec import load_workload
from thunderserve.spec.cluster import ClusterSpec, resolve_cluster
from thunderserve.spec.model import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
MAX_ROUNDS = 6  # fit/simulate rounds for the neighbours' busy fractions
console = Console(stderr=True)


def load_avg() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def profile_step(args: argparse.Namespace, out: Path, session: str) -> EngineProfile:
    """One profiling session (`session`: "before" / "after" serving), written to profile_<session>.json."""
    grid = (ProfileGrid(prefill_batch_sizes=(1, 2), prompt_tokens=(16, 64), decode_batch_sizes=(1, 4),
                        context_tokens=(32, 128), kv_tokens=(64,), warmup=1, repeats=2) if args.quick
            else ProfileGrid(prefill_batch_sizes=(1, 2), prompt_tokens=(16, 64, 128, 256),
                             decode_batch_sizes=(1, 2, 4, 8), context_tokens=(64, 256), kv_tokens=(64, 256),
                             warmup=1, repeats=2))
    engine = spec = None
    if args.model.startswith("fake"):
        from thunderserve.cli.serve_cmds import FAKE_MODEL
        from thunderserve.runtime.fakes import FakeEngine

        engine, spec = FakeEngine(), FAKE_MODEL
    console.print(f"profiling {args.model} {session} serving ({args.cpu_threads} thread(s), alone and with "
                  f"{args.neighbours} busy neighbour(s)); load {load_avg()} ...")
    prof = run_profile(args.model, "cpu", grid, engine=engine, model_spec=spec, threads=args.cpu_threads,
                       neighbours=args.neighbours,
                       on_step=lambda label: console.print(f"      {label}", highlight=False))
    (out / f"profile_{session}.json").write_text(dump_profile(prof))
    return prof


def check_profile(prof: EngineProfile, args: argparse.Namespace) -> None:
    """The profile must describe the served workers: same torch thread count."""
    if prof.device.kind != "cpu" or prof.device.threads != args.cpu_threads:
        raise SystemExit(f"error: --profile: measured on {prof.device.kind} with {prof.device.threads} thread(s); "
                         f"the workers run on cpu with --cpu-threads {args.cpu_threads}")


def write_inputs(prof: EngineProfile, out: Path, busy: dict[PassKind, float],
                 cpu_share: dict[tuple[PassKind, bool], float] | None = None) -> tuple[Path, Path, Path]:
    """calibration.json, cluster.yaml (2 calibrated devices on node 'local'), HF-style config.json of the model.

    `busy[phase]`: how often the other worker computes while this one runs a pass of that phase (see
    `EngineProfile.samples`); the device is fitted to those expected latencies.
    """
    cpu = fit_engine_profile(prof.model, prof.device_spec(), prof.samples(busy, cpu_share))
    (out / "calibration.json").write_text(dump_calibration(merge(None, [cpu], [str(out / "profile.json")])))
    # the two workers exchange KV caches over the runtime's transport on loopback TCP: the node's link is the
    # measured encode + transfer + decode path for the plan's compression (not the device's memory bandwidth)
    node: dict[str, object] = {"name": "local", "gpu": cpu.spec.name, "count": 2}
    link_gbs = prof.kv_link_gbs(demo_plan(prof.model).kv_transfer.compression)
    if link_gbs is not None:
        node["intra_node_gbs"] = round(link_gbs, 4)
    console.print(f"      CPU fit (neighbour busy {busy[PassKind.PREFILL]:.2f} during prefill, "
                  f"{busy[PassKind.DECODE]:.2f} during decode): compute eff {cpu.spec.compute_efficiency:.3f}, "
                  f"memory eff {cpu.spec.memory_efficiency:.3f}, saturation "
                  f"{cpu.spec.compute_saturation_tokens:.1f} tokens, layer overhead {cpu.spec.layer_overhead_us:.0f} "
                  f"us; fit median error {cpu.errors.median_relative_error:.1%}; KV link "
                  f"{'not measured' if link_gbs is None else f'{link_gbs:.2f} GB/s'}", highlight=False)
    cluster = {"name": "local", "gpu_types": [cpu.spec.model_dump(mode="json")], "nodes": [node]}
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


# ---- serving ----------------------------------------------------------------------------------------------


def serve_child(args: argparse.Namespace) -> None:
    """Body of the serving subprocess: the demo plan with re-scheduling off (the CLI has no switch for it)."""
    from thunderserve.cli.serve_cmds import model_spec_for
    from thunderserve.runtime.launch.serve import ServeConfig, serve

    plan = demo_plan(model_spec_for(args.model))
    serve(plan, ServeConfig(model=args.model, port=args.port, cpu_threads=args.cpu_threads, device="cpu",
                            resched=False))


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


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) a process has used, from /proc (None when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMonitor:
    """Samples the workers' CPU time every `period_s` (a thread): what share of a core each got while busy.

    A diagnostic of the shared machine, not a model input: the profile records the same share for itself
    (`EngineProfile.cpu_share`), so a gap between the two says the background load differed between them.
    """

    def __init__(self, pids: dict[str, int], period_s: float = 0.5) -> None:
        self.pids = pids
        self.period_s = period_s
        self.samples: list[dict[str, float]] = []  # per period: group -> CPU share of one core
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuMonitor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        prev = {g: _cpu_s(p) for g, p in self.pids.items()}
        t_prev = time.perf_counter()
        while not self._stop.wait(self.period_s):
            now = time.perf_counter()
            cur = {g: _cpu_s(p) for g, p in self.pids.items()}
            self.samples.append({g: ((cur[g] or 0.0) - (prev[g] or 0.0)) / (now - t_prev) for g in self.pids})
            prev, t_prev = cur, now

    def busy_shares(self, busy_above: float = 0.05) -> dict[tuple[str, bool], float]:
        """Mean share of a core per (group, whether the other workers were busy too) over the periods inside a
        busy stretch (its first and last period are partly idle, so they are left out). The mean, not the
        median: total CPU over total wall time is the speed at which the work actually got done."""
        out: dict[tuple[str, bool], float] = {}
        ss = self.samples
        inner = [ss[i] for i in range(1, len(ss) - 1)
                 if all(ss[j][g] > busy_above or ss[i][g] <= busy_above for j in (i - 1, i + 1) for g in ss[i])]
        for g in self.pids:
            alone = [s[g] for s in inner if s[g] > busy_above and all(s[o] <= busy_above for o in s if o != g)]
            both = [s[g] for s in inner if all(v > busy_above for v in s.values())]
            for other_busy, values in ((False, alone), (True, both)):
                if values:
                    out[(g, other_busy)] = float(np.mean(values))
        return out


def stack_round_trip_ms(url: str, repeats: int = 8) -> float:
    """Median time of a request that crosses the whole serving stack but computes nothing: HTTP -> router ->
    prefill worker (tokenise, validate: max_tokens over the context, rejected) -> router -> HTTP 400.

    The per-request cost the simulator does not model (API, router and IPC hops); measured on the idle
    deployment before the replay, so it can be compared with the TTFTs.
    """
    model = httpx.get(f"{url}/v1/models", timeout=10.0).json()["data"][0]
    ctx = int(model["max_model_len"])
    times = []
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for _ in range(repeats):
            body = {"model": model["id"], "prompt": "the of and to", "max_tokens": ctx - 1, "stream": True}
            t0 = time.perf_counter()
            if client.post("/v1/completions", json=body).status_code != 400:
                raise RuntimeError("the stack probe was not rejected (expected HTTP 400: over the context)")
            times.append(time.perf_counter() - t0)
            time.sleep(0.1)
    return float(np.median(times)) * 1e3


def serve_and_bench(args: argparse.Namespace, out: Path
                    ) -> tuple[list[RequestResult], str, dict[tuple[str, bool], float], float]:
    """Replay the schedule against the served demo plan: (per-request results, load average after the run,
    the workers' CPU shares while busy (`CpuMonitor.busy_shares`), the serving stack's round trip in ms)."""
    url = f"http://127.0.0.1:{args.port}"
    log = (out / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, __file__, "--serve-child", "--model", args.model, "--port",
                             str(args.port), "--cpu-threads", str(args.cpu_threads)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        console.print(f"serving the demo plan on {url} (re-scheduling off) ...")
        wait_ready(url, proc, args.ready_timeout)
        reqs = plan_requests(load_workload(args.workload), args.rate, args.duration, args.seed,
                             args.max_prompt_tokens, args.max_output_tokens)
        console.print(f"replaying {len(reqs)} requests of {args.workload} at {args.rate} req/s for "
                      f"{args.duration} s; load {load_avg()} ...")
        stack_ms = stack_round_trip_ms(url)
        console.print(f"serving stack round trip (a request the worker tokenises and rejects): {stack_ms:.1f} ms")
        workers = httpx.get(f"{url}/admin/workers", timeout=10.0).json()["data"]
        with CpuMonitor({str(w["group_id"]): int(w["pid"]) for w in workers}) as monitor:
            results, _ = asyncio.run(run_load(url, reqs, seed=args.seed))
        (out / "cpu_samples.json").write_text(json.dumps({"period_s": monitor.period_s, "pids": monitor.pids,
                                                          "samples": monitor.samples}))
        return results, load_avg(), monitor.busy_shares(), stack_ms
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


# ---- simulation -------------------------------------------------------------------------------------------


def simulate_same(args: argparse.Namespace, out: Path, prof: EngineProfile,
                  cpu_share: dict[tuple[PassKind, bool], float] | None = None
                  ) -> tuple[SimResult, dict[PassKind, float], dict[str, float]]:
    """The same request schedule, plan and calibrated device through the simulator (every request measured).

    With a profile measured next to busy neighbours, the device is fitted to the latencies expected at the
    neighbours' busy fractions, which come from the simulated run itself: fit, simulate, read the fractions,
    refit, until they move by less than 0.02 (a few rounds).
    """
    reqs = plan_requests(load_workload(args.workload), args.rate, args.duration, args.seed, args.max_prompt_tokens,
                         args.max_output_tokens)
    with (out / "trace.csv").open("w", newline="") as fh:  # for `thunderserve simulate --trace` by hand
        w = csv.writer(fh)
        w.writerow(["arrived_at", "num_prefill_tokens", "num_decode_tokens"])
        for r in reqs:
            w.writerow([f"{r.send_at_s:.6f}", r.prompt_tokens, r.output_tokens])
    plan = demo_plan(prof.model).model_copy(update={"model": prof.model.name})
    (out / "plan.json").write_text(plan.to_json())
    arrays = (np.array([r.send_at_s for r in reqs]), np.array([r.prompt_tokens for r in reqs]),
              np.array([r.output_tokens for r in reqs]))
    console.print(f"calibrating the CPU device and simulating the same {len(reqs)} requests ...")
    busy = {PassKind.PREFILL: 0.0, PassKind.DECODE: 0.0}
    for _ in range(MAX_ROUNDS):
        _, cluster_yaml, _ = write_inputs(prof, out, busy, cpu_share)
        cluster = resolve_cluster(ClusterSpec.model_validate(yaml.safe_load(cluster_yaml.read_text())), "local")
        res = simulate(plan, cluster, prof.model, *arrays, SimConfig(warmup_s=0.0))
        perf = group_perf_of(plan.groups[0], prof.model, cluster)
        if not prof.shared_measurements:
            break
        new = neighbour_busy(res, perf)
        if max(abs(new[k] - busy[k]) for k in busy) < 0.02:
            break
        busy = new
    return res, busy, worker_utilisation(res, perf)


# ---- report -----------------------------------------------------------------------------------------------


def _stats(ttft: np.ndarray, tpot: np.ndarray, throughput_rps: float, tokens_s: float) -> dict[str, float]:
    out: dict[str, float] = {"throughput_rps": throughput_rps, "throughput_tokens_s": tokens_s}
    for stem, v in (("ttft", ttft), ("tpot", tpot)):
        v = v[np.isfinite(v)]
        out[f"mean_{stem}_s"] = float(v.mean()) if v.size else math.nan
        for q in (50, 90):
            out[f"p{q}_{stem}_s"] = float(np.percentile(v, q)) if v.size else math.nan
    return out


def measured_stats(results: list[RequestResult]) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    span = max((r.finish_s for r in ok), default=math.nan)
    return _stats(np.array([r.ttft_s for r in ok]), np.array([r.tpot_s for r in ok]),
                  len(ok) / span if ok else math.nan, sum(r.output_tokens for r in ok) / span if ok else math.nan)


def simulated_stats(res: SimResult) -> dict[str, float]:
    span = float(np.nanmax(res.finish_s)) if res.num_requests else math.nan
    tpot = np.where(res.output_tokens > 1, res.tpot_s, np.nan)
    return _stats(res.ttft_s, tpot, res.num_requests / span, float(res.output_tokens.sum()) / span)


METRICS = [("mean_ttft_s", "mean TTFT (ms)", 1e3, True), ("p50_ttft_s", "p50 TTFT (ms)", 1e3, False),
           ("p90_ttft_s", "p90 TTFT (ms)", 1e3, False), ("mean_tpot_s", "mean TPOT (ms)", 1e3, True),
           ("p50_tpot_s", "p50 TPOT (ms)", 1e3, False), ("p90_tpot_s", "p90 TPOT (ms)", 1e3, False),
           ("throughput_rps", "throughput (req/s)", 1.0, False),
           ("throughput_tokens_s", "throughput (tok/s)", 1.0, False)]


def report(args: argparse.Namespace, measured: dict[str, float], variants: dict[str, dict[str, float]], n: int,
           notes: dict[str, str]) -> dict[str, bool]:
    """Print the table; per simulated variant, whether every done-when metric (mean TTFT, mean TPOT) is within
    the tolerance."""
    table = Table(title=f"{args.model}: served vs simulated ({args.workload}, {args.rate} req/s, {args.duration} s, "
                        f"{n} requests, {args.cpu_threads} thread(s) per worker)")
    table.add_column("metric")
    table.add_column("measured", justify="right")
    for name in variants:
        table.add_column(f"sim: {name}", justify="right")
        table.add_column(f"ratio, within {args.tolerance:.0%}", justify="right")
    passed = dict.fromkeys(variants, True)
    for key, label, scale, gate in METRICS:
        m = measured.get(key, math.nan)
        row = [label + ("" if gate else " (info)"), f"{m * scale:.4g}"]
        for name, simulated in variants.items():
            s = simulated.get(key, math.nan)
            ok = math.isfinite(m) and math.isfinite(s) and m > 0 and abs(s / m - 1) <= args.tolerance
            passed[name] &= ok or not gate
            row += [f"{s * scale:.4g}", f"{s / m:.2f} {'PASS' if ok else 'FAIL'}" if m else "-"]
        table.add_row(*row)
    wide = Console(width=150)
    wide.print(table)
    for what, value in notes.items():
        wide.print(f"{'load average ' if what.startswith(('before', 'after')) else ''}{what}: {value}")
    for name, ok in passed.items():
        wide.print(f"done-when (mean TTFT and mean TPOT within {args.tolerance:.0%}), sim: {name}: "
                        f"{'PASS' if ok else 'FAIL'}")
    return passed


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
    ap.add_argument("--neighbours", type=int, default=1,
                    help="Busy neighbour processes while profiling (the demo plan's other worker: 1; 0: alone)")
    ap.add_argument("--port", type=int, default=8617)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--tolerance", type=float, default=0.25, help="Allowed |simulated / measured - 1|")
    ap.add_argument("--quick", action="store_true", help="Small profiling grid")
    ap.add_argument("--no-profile-after", action="store_true",
                    help="Profile only before serving (default: before and after, samples pooled, so the profile "
                         "sees the machine's background load over the same window as the served run)")
    ap.add_argument("--out", default="out/bench_fidelity")
    ap.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_child:
        serve_child(args)
        return
    out = Path(args.out)
    for d in (out, out / "sim_profile", out / "sim_served_share"):
        d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    loads = {"before profiling": load_avg()}
    sessions = [load_profile(Path(args.profile))] if args.profile else [profile_step(args, out, "before")]
    check_profile(sessions[0], args)
    loads["after profiling"] = load_avg()
    results, loads["after serving"], shares, stack_ms = serve_and_bench(args, out)
    if not args.profile and not args.no_profile_after:
        sessions.append(profile_step(args, out, "after"))
        loads["after the second profile"] = load_avg()
    prof = pool_profiles(sessions)
    (out / "profile.json").write_text(dump_profile(prof))
    measured = measured_stats(results)
    variants: dict[str, dict[str, float]] = {}
    runs: dict[str, SimResult] = {}
    # (a) the profile's wall-clock latencies, pooled over both sessions
    runs["profile"], busy, util = simulate_same(args, out / "sim_profile", prof)
    loads["simulated utilisation"] = ", ".join(f"{k} {v:.0%}" for k, v in util.items())
    loads["neighbour busy (prefill, decode)"] = f"{busy[PassKind.PREFILL]:.2f}, {busy[PassKind.DECODE]:.2f}"
    # (b) the profile's CPU seconds per pass at the CPU share the served workers got (`EngineProfile.samples`)
    served_share = served_cpu_share(shares, prof)
    if served_share:
        runs["served CPU share"], busy_b, _ = simulate_same(args, out / "sim_served_share", prof, served_share)
        loads["neighbour busy at the served share"] = \
            f"{busy_b[PassKind.PREFILL]:.2f}, {busy_b[PassKind.DECODE]:.2f}"
    variants = {name: simulated_stats(res) for name, res in runs.items()}
    loads["serving stack round trip"] = f"{stack_ms:.1f} ms (not modelled)"
    cpu = {"profiler alone": prof.cpu_share(), "profiler with a busy neighbour": prof.cpu_share(shared=True),
           **{f"served {g}{' with the other busy' if both else ' alone'}": v for (g, both), v in shares.items()}}
    loads["CPU share of one core while busy"] = ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if v is not None)
    per_request = [{"send_at_s": r.planned.send_at_s, "prompt_tokens": r.planned.prompt_tokens,
                    "server_prompt_tokens": r.prompt_tokens, "output_tokens": r.planned.output_tokens,
                    "measured_ttft_s": r.ttft_s, "measured_tpot_s": r.tpot_s, "ok": r.ok, "error": r.error,
                    **{f"sim_{name}_ttft_s": float(res.ttft_s[i]) for name, res in runs.items()},
                    **{f"sim_{name}_tpot_s": float(res.tpot_s[i]) for name, res in runs.items()}}
                   for i, r in enumerate(results)]
    passed = report(args, measured, variants, len(results), loads)
    (out / "result.json").write_text(json.dumps({"measured": measured, "simulated": variants, "passed": passed,
                                                 "notes": loads, "requests": per_request}, indent=2, default=str))
    failed = [r for r in results if not r.ok]
    if failed:
        console.print(f"warning: {len(failed)} requests failed: {sorted({r.error for r in failed})}")


def served_cpu_share(shares: dict[tuple[str, bool], float], prof: EngineProfile
                     ) -> dict[tuple[PassKind, bool], float]:
    """The served workers' CPU shares by (phase of the passes, neighbour busy): p0 runs the prefills, d0 the
    decode steps; a combination not observed in the run takes the profiler's own share (wall time as measured).
    Empty when the profile has no CPU times."""
    own = {False: prof.cpu_share(), True: prof.cpu_share(shared=True)}
    out: dict[tuple[PassKind, bool], float] = {}
    for group, phase in (("p0", PassKind.PREFILL), ("d0", PassKind.DECODE)):
        for busy in (False, True):
            share = shares.get((group, busy), own[busy])
            if share is None:
                return {}
            out[(phase, busy)] = share
    return out


if __name__ == "__main__":
    main()
