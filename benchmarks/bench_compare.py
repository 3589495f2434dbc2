"""ThunderServe vs the baselines on every built-in scenario (paper-cloud-32 x coding, conversation; llama-30b),
baselines also on inhouse-8xa100 at the same price. Prints each comparison table and the ratios
ThunderServe / best baseline for max_rate_at_slo and latency_deadline_scale (deadline: lower is better, so
the ratio printed is best baseline / ThunderServe, > 1 meaning ThunderServe meets a tighter deadline).

Targets from the issue: >= 1.3x the best baseline's max rate on paper-cloud-32 for both workloads; on
inhouse-8xa100 no worse than DistServe. Usage:
    .venv/bin/python benchmarks/bench_compare.py [--workloads coding,conversation] [--out results.json]
    .venv/bin/python benchmarks/bench_compare.py --slo-scales 1.5,2,2.5,3,5   # ratio across SLO tightness
    .venv/bin/python benchmarks/bench_compare.py --slo-scales 5 --tpot-scales 1.5,2,3   # tight TPOT only
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from thunderserve.cli.common import make_slo
from thunderserve.report import CompareConfig, comparison_table, plot_comparison, run_comparison
from thunderserve.spec import load_cluster, load_model, load_workload

console = Console(width=160)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarise(doc: dict[str, Any], baseline_cluster: str) -> dict[str, Any]:
    sys = doc["systems"]
    ts = sys["thunderserve"]
    main = {k: v for k, v in sys.items() if "@" not in k and k != "thunderserve"}
    other = {k: v for k, v in sys.items() if k.endswith(f"@{baseline_cluster}")}
    best_name = max(main, key=lambda k: main[k]["max_rate_at_slo"] or 0.0)
    best_deadline = min((v["latency_deadline_scale"] for v in main.values() if v["latency_deadline_scale"]),
                        default=None)
    ds_home = other.get(f"distserve@{baseline_cluster}", {})
    best_home = max(other, key=lambda k: other[k]["max_rate_at_slo"] or 0.0) if other else None
    return {
        "workload": doc["workload"],
        "thunderserve_rps": ts["max_rate_at_slo"],
        "best_baseline": best_name,
        "best_baseline_rps": main[best_name]["max_rate_at_slo"],
        "rate_ratio": ratio(ts["max_rate_at_slo"], main[best_name]["max_rate_at_slo"]),
        "deadline_ratio": ratio(best_deadline, ts["latency_deadline_scale"]),
        "vs_distserve_inhouse": ratio(ts["max_rate_at_slo"], ds_home.get("max_rate_at_slo")),
        "best_inhouse": best_home,
        "vs_best_inhouse": ratio(ts["max_rate_at_slo"], other[best_home]["max_rate_at_slo"]) if best_home else None,
    }


def reporter(bar: Progress, task: TaskID, label: str) -> Callable[[int, int, str], None]:
    def tick(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=f"{label}: {what}")

    return tick


def fmt(x: float | None, spec: str = "{:.2f}") -> str:
    return "-" if x is None else spec.format(x)


def sweep(args: argparse.Namespace, scales: list[float]) -> None:
    """Max rate at the SLO of every system per workload and SLO scale, and ThunderServe's ratio to the best.

    With --tpot-scales, each (TTFT scale, TPOT scale) pair is run instead of equal scales."""
    cluster, model = load_cluster(args.cluster), load_model(args.model)
    config = CompareConfig(planner_time_limit_s=args.time_limit, curves=False, verify_top=args.verify_top)
    rows: list[dict[str, Any]] = []
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        tpot_scales = [float(x) for x in args.tpot_scales.split(",") if x.strip()] if args.tpot_scales else None
        pairs = [(a, b) for a in scales for b in tpot_scales] if tpot_scales else [(a, a) for a in scales]
        task = bar.add_task("sweep", total=len(names) * len(pairs))
        for name in names:
            workload = load_workload(name)
            for scale, tpot_scale in pairs:
                bar.update(task, description=f"{name} @ SLO x{scale:g}/x{tpot_scale:g}")
                ref = make_slo(model, workload, 1.0, None, None, 0.9)
                slo = make_slo(model, workload, scale if scale == tpot_scale else None,
                               None if scale == tpot_scale else ref.ttft_ms * scale,
                               None if scale == tpot_scale else ref.tpot_ms * tpot_scale, 0.9)
                doc = run_comparison(cluster, model, workload, slo, config=config)
                rates = {k: v["max_rate_at_slo"] or 0.0 for k, v in doc["systems"].items()}
                best = max((k for k in rates if k != "thunderserve"), key=lambda k: rates[k])
                phases = doc["systems"]["thunderserve"].get("phases", {})
                rows.append({"workload": name, "slo_scale": scale, "tpot_scale": tpot_scale, "ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms,
                             "rates": rates, "best_baseline": best, "ratio": ratio(rates["thunderserve"], rates[best]),
                             "thunderserve_phases": phases})
                bar.advance(task)
    systems = list(rows[0]["rates"]) if rows else []
    table = Table(title=f"max rate at SLO (req/s) by SLO scale ({args.model}, {args.cluster})")
    for col in ["workload", "TTFT/TPOT scale", "TTFT/TPOT ms", *systems, "TS / best", "TS groups P/D/C"]:
        table.add_column(col, justify="right")
    for r in rows:
        ph = r["thunderserve_phases"]
        table.add_row(r["workload"], f"{r['slo_scale']:g}/{r['tpot_scale']:g}", f"{r['ttft_ms']:.0f}/{r['tpot_ms']:.0f}",
                      *[fmt(r["rates"][k]) for k in systems], fmt(r["ratio"], "{:.2f}x"),
                      f"{ph.get('prefill', 0)}/{ph.get('decode', 0)}/{ph.get('colocated', 0)}")
    console.print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"sweep": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="paper-cloud-32")
    ap.add_argument("--baseline-cluster", default="inhouse-8xa100")
    ap.add_argument("--model", default="llama-30b")
    ap.add_argument("--workloads", default="coding,conversation")
    ap.add_argument("--time-limit", type=float, default=10.0)
    ap.add_argument("--verify-top", type=int, default=0,
                    help="ThunderServe's planner re-scores its K best candidates by simulation (0: off)")
    ap.add_argument("--out", help="write every comparison document to this JSON file")
    ap.add_argument("--plot-dir", help="write one comparison plot per workload here")
    ap.add_argument("--slo-scales", help="comma-separated SLO scales: sweep them instead of the default-SLO "
                    "comparison (ThunderServe vs each baseline on --cluster only, no curves)")
    ap.add_argument("--tpot-scales", help="with --slo-scales: comma-separated TPOT scales, each swept at every "
                    "--slo-scales value used for TTFT only (how tight decoding deadlines change the picture)")
    args = ap.parse_args()
    if args.slo_scales:
        sweep(args, [float(x) for x in args.slo_scales.split(",") if x.strip()])
        return
    cluster, home, model = load_cluster(args.cluster), load_cluster(args.baseline_cluster), load_model(args.model)
    docs, summaries = [], []
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        workload = load_workload(name)
        slo = make_slo(model, workload, None, None, None, 0.9)
        t0 = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(name, total=None)
            doc = run_comparison(cluster, model, workload, slo, baseline_cluster=home,
                                 config=CompareConfig(planner_time_limit_s=args.time_limit, verify_top=args.verify_top),
                                 progress=reporter(bar, task, name))
        console.print(comparison_table(doc))
        console.print(f"[dim]{name}: {time.perf_counter() - t0:.0f} s[/dim]")
        if args.plot_dir:
            plot_comparison(doc, Path(args.plot_dir) / f"compare_{name}.png")
        docs.append(doc)
        summaries.append(summarise(doc, home.name))
    table = Table(title=f"ThunderServe / best baseline ({args.model}, {args.cluster}; baselines also on {home.name})")
    for col in ("workload", "ThunderServe req/s", "best baseline", "its req/s", "rate ratio (target >= 1.3)",
                "deadline ratio", f"vs distserve@{home.name} (target >= 1)", f"vs best @{home.name}"):
        table.add_column(col, justify="right")
    for s in summaries:
        table.add_row(s["workload"], fmt(s["thunderserve_rps"]), s["best_baseline"], fmt(s["best_baseline_rps"]),
                      fmt(s["rate_ratio"], "{:.2f}x"), fmt(s["deadline_ratio"], "{:.2f}x"),
                      fmt(s["vs_distserve_inhouse"], "{:.2f}x"),
                      f"{fmt(s['vs_best_inhouse'], '{:.2f}x')} ({s['best_inhouse']})")
    console.print(table)
    if args.out:
        Path(args.out).write_text(json.dumps({"comparisons": docs, "summary": summaries}, indent=2))


if __name__ == "__main__":
    main()
