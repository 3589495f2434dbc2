"""ThunderServe vs every system of `report.systems.SYSTEMS`: regenerates every table and figure of the README's
comparison section.

Headline: llama-30b on paper-cloud-32 (every system also on inhouse-8xa100) and two generated clusters (benchmarks/clusters/), both
workloads (conversation, coding), at the default SLOs (TTFT 5x the reference latency, TPOT DistServe's published
target). The paper's framing beside it: ThunderServe on paper-cloud-32 against every system on inhouse-8xa100 at
the same price (`--baseline-cluster inhouse-8xa100`). Sweep: every system's max rate over tighter and looser
TPOT targets on paper-cloud-32. Every row is one `thunderserve compare` run whose exact command is printed with it
(search budget and seeds, not wall-clock time, decide every figure: it reproduces to the digit).

    .venv/bin/python benchmarks/bench_compare.py --out results.json --plot-dir docs/figures   # headline + sweep
    .venv/bin/python benchmarks/bench_compare.py --only headline --clusters paper-cloud-32 --workloads coding
    .venv/bin/python benchmarks/bench_compare.py --only sweep --tpot-scales 0.5,0.75,1,1.5

Prints per comparison the table of systems, then the headline table and ThunderServe's ratios to the published
peers (vllm, distserve, hexgen): mean and max of max-rate and latency-deadline ratios, and the smallest ratio to
any system at any reported point (target >= 0.98).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from thunderserve.cli.common import make_slo
from thunderserve.report import CompareConfig, comparison_table, plot_comparison, run_comparison
from thunderserve.report.systems import PUBLISHED_PEERS
from thunderserve.scheduler.config import DEFAULT_MAX_EVALUATIONS
from thunderserve.sim.config import LoadConfig, SimConfig
from thunderserve.spec import load_cluster, load_model, load_workload

console = Console(width=180)
HERE = Path(__file__).parent
# inhouse-8xa100 is measured inside the paper-cloud-32 rows (`--baseline-cluster`: every system planned there)
CLUSTERS = ("paper-cloud-32", str(HERE / "clusters" / "gen-16-s1.yaml"), str(HERE / "clusters" / "gen-24-s2.yaml"))
HOME = "inhouse-8xa100"


def command(args: argparse.Namespace, cluster: str, workload: str, baseline: str | None = None,
            ttft_ms: float | None = None, tpot_ms: float | None = None, curves: bool = True) -> list[str]:
    """The `thunderserve compare` command line that reproduces one row."""
    where = os.path.relpath(cluster) if cluster.endswith(".yaml") else cluster  # as typed from the repository
    cmd = ["thunderserve", "compare", "--cluster", where, "--model", args.model, "--workload", workload,
           "--budget", str(args.budget), "--duration", f"{args.duration:g}", "--min-requests",
           str(args.min_requests), "--warmup", f"{args.warmup:g}", "--seed", str(args.seed)]
    if args.verify_top:
        cmd += ["--verify-top", str(args.verify_top)]
    if baseline:
        cmd += ["--baseline-cluster", baseline]
    if ttft_ms is not None and tpot_ms is not None:
        cmd += ["--ttft-ms", f"{ttft_ms:.6g}", "--tpot-ms", f"{tpot_ms:.6g}"]
    if not curves:
        cmd += ["--no-curves"]
    return cmd + ["--json"]


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One comparison (runs in a worker process)."""
    model, workload = load_model(job["model"]), load_workload(job["workload"])
    slo = make_slo(model, workload, None, job.get("ttft_ms"), job.get("tpot_ms"), 0.9)
    config = CompareConfig(load=LoadConfig(duration_s=job["duration"], seed=job["seed"],
                                           min_requests=job["min_requests"]),
                           sim=SimConfig(warmup_s=job["warmup"]), budget=job["budget"], seed=job["seed"],
                           verify_top=job["verify_top"], curves=job["curves"])
    t0 = time.perf_counter()
    base = load_cluster(job["baseline"]) if job.get("baseline") else None
    doc = run_comparison(load_cluster(job["cluster"]), model, workload, slo, baseline_cluster=base, config=config)
    doc["bench"] = {"command": job["command"], "wall_s": round(time.perf_counter() - t0, 1), "kind": job["kind"],
                    "tpot_scale": job.get("tpot_scale")}
    if job.get("save_dir"):  # each comparison as soon as it is done (a long run keeps what it finished)
        name = f"{job['kind']}_{short(job['cluster'])}_{job['workload']}_{job.get('tpot_scale') or 1:g}.json"
        (Path(job["save_dir"]) / name).write_text(json.dumps(doc, indent=1))
    return doc


def jobs_for(args: argparse.Namespace) -> list[dict[str, Any]]:
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    common = {"model": args.model, "budget": args.budget, "duration": args.duration,
              "min_requests": args.min_requests, "warmup": args.warmup, "save_dir": args.save_dir,
              "seed": args.seed, "verify_top": args.verify_top}
    out: list[dict[str, Any]] = []
    if args.only in (None, "headline"):
        for cluster in [c.strip() for c in args.clusters.split(",") if c.strip()]:
            for w in workloads:
                base = HOME if cluster == "paper-cloud-32" else None  # the paper's framing, same price
                out.append({**common, "kind": "headline", "cluster": cluster, "workload": w, "baseline": base,
                            "curves": not args.no_curves,
                            "command": command(args, cluster, w, base, curves=not args.no_curves)})
    if args.only in (None, "sweep"):
        model = load_model(args.model)
        for w in workloads:
            ref = make_slo(model, load_workload(w), None, None, None, 0.9)
            for s in [float(x) for x in args.tpot_scales.split(",") if x.strip()]:
                if s == 1.0 and args.only is None:
                    continue  # the headline row is this point
                tpot = ref.tpot_ms * s
                out.append({**common, "kind": "sweep", "cluster": args.sweep_cluster, "workload": w,
                            "ttft_ms": ref.ttft_ms, "tpot_ms": tpot, "tpot_scale": s, "curves": False,
                            "command": command(args, args.sweep_cluster, w, None, ref.ttft_ms, tpot, curves=False)})
    return out


def fmt(x: float | None, spec: str = "{:.2f}") -> str:
    return "-" if x is None else spec.format(x)


def short(cluster: str) -> str:
    return Path(cluster).stem if cluster.endswith(".yaml") else cluster


def print_tables(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline and sweep tables, and the ratios to the published peers over every reported point."""
    names: list[str] = []
    for d in docs:
        names += [n for n in d["systems"] if "@" not in n and n not in names]
    table = Table(title="max rate at the SLO (req/s); latency deadline (tightest SLO scale met at the common rate)")
    for col in ["cluster", "workload", "TTFT/TPOT ms", *names, "TS / best other", "command"]:
        table.add_column(col, justify="right" if col not in ("cluster", "workload", "command") else "left")
    rate_ratios: list[float] = []
    deadline_ratios: list[float] = []
    worst: tuple[float, str] | None = None
    for d in docs:
        sysd = d["systems"]
        ts = sysd["thunderserve"]
        others = {n: v for n, v in sysd.items() if n != "thunderserve" and "@" not in n}
        best = max(others, key=lambda n: others[n]["max_rate_at_slo"] or 0.0)
        ratio = (ts["max_rate_at_slo"] or 0.0) / others[best]["max_rate_at_slo"] \
            if others[best]["max_rate_at_slo"] else None
        cells = []
        for n in names:
            v = sysd.get(n)
            cells.append("" if v is None else f"{fmt(v['max_rate_at_slo'])} / {fmt(v['latency_deadline_scale'])}")
        table.add_row(short(d["cluster"]), d["workload"], f"{d['slo']['ttft_ms']:.0f}/{d['slo']['tpot_ms']:.0f}",
                      *cells, f"{fmt(ratio, '{:.2f}x')} ({best})", shlex.join(d["bench"]["command"]))
        for n, r in d["summary"]["vs"].items():
            if "@" in n:
                continue
            if n in PUBLISHED_PEERS:
                if r["max_rate_ratio"] is not None:
                    rate_ratios.append(r["max_rate_ratio"])
                if r["deadline_ratio"] is not None:
                    deadline_ratios.append(r["deadline_ratio"])
            if r["max_rate_ratio"] is not None and (worst is None or r["max_rate_ratio"] < worst[0]):
                worst = (r["max_rate_ratio"], f"{n} on {short(d['cluster'])} {d['workload']} "
                                              f"TPOT {d['slo']['tpot_ms']:.0f} ms")
    console.print(table)
    paper = [d for d in docs if any(n.endswith(f"@{HOME}") for n in d["systems"])]
    if paper:
        home = Table(title=f"the paper's framing: ThunderServe on the cloud vs each system on {HOME} (same $/h)")
        for col in ("workload", "ThunderServe (cloud) req/s", *[f"{n}@{HOME}" for n in names], "TS / best @home"):
            home.add_column(col, justify="right")
        for d in paper:
            sysd = d["systems"]
            at_home = {n: sysd.get(f"{n}@{HOME}", {}).get("max_rate_at_slo") for n in names}
            best = max((v or 0.0) for v in at_home.values())
            home.add_row(d["workload"], fmt(sysd["thunderserve"]["max_rate_at_slo"]),
                         *[fmt(at_home[n]) for n in names],
                         fmt((sysd["thunderserve"]["max_rate_at_slo"] or 0) / best if best else None, "{:.2f}x"))
        console.print(home)
    summary = {
        "peers_mean_max_rate_ratio": sum(rate_ratios) / len(rate_ratios) if rate_ratios else None,
        "peers_max_max_rate_ratio": max(rate_ratios, default=None),
        "peers_mean_deadline_ratio": sum(deadline_ratios) / len(deadline_ratios) if deadline_ratios else None,
        "peers_max_deadline_ratio": max(deadline_ratios, default=None),
        "min_ratio_vs_any_system": worst[0] if worst else None, "min_ratio_at": worst[1] if worst else None,
    }
    console.print(f"vs published peers ({', '.join(PUBLISHED_PEERS)}) over every reported point: max rate mean "
                  f"{fmt(summary['peers_mean_max_rate_ratio'], '{:.2f}x')}, max "
                  f"{fmt(summary['peers_max_max_rate_ratio'], '{:.2f}x')}; latency deadline mean "
                  f"{fmt(summary['peers_mean_deadline_ratio'], '{:.2f}x')}, max "
                  f"{fmt(summary['peers_max_deadline_ratio'], '{:.2f}x')}; smallest ratio to any system "
                  f"{fmt(summary['min_ratio_vs_any_system'], '{:.2f}x')} ({summary['min_ratio_at']})")
    return summary


def markdown(docs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """The README's comparison tables: max rate at the SLO / latency deadline per system and row, the paper's
    framing, and the ratios."""
    names: list[str] = []
    for d in docs:
        names += [n for n in d["systems"] if "@" not in n and n not in names]
    lines = ["| cluster | workload | TTFT / TPOT (ms) | " + " | ".join(names) + " |",
             "| --- | --- | --- | " + " | ".join("---:" for _ in names) + " |"]
    for d in docs:
        sysd = d["systems"]
        cells = []
        for n in names:
            v = sysd.get(n)
            cells.append("" if v is None else f"{fmt(v['max_rate_at_slo'])} / {fmt(v['latency_deadline_scale'])}")
        lines.append(f"| {short(d['cluster'])} | {d['workload']} | {d['slo']['ttft_ms']:.0f} / "
                     f"{d['slo']['tpot_ms']:.0f} | " + " | ".join(cells) + " |")
    paper = [d for d in docs if any(n.endswith(f"@{HOME}") for n in d["systems"])]
    if paper:
        lines += ["", "| workload | ThunderServe on paper-cloud-32 | " + " | ".join(f"{n} @{HOME}" for n in names)
                  + " |", "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
        for d in paper:
            sysd = d["systems"]
            lines.append(f"| {d['workload']} | {fmt(sysd['thunderserve']['max_rate_at_slo'])} | " + " | ".join(
                fmt(sysd.get(f"{n}@{HOME}", {}).get("max_rate_at_slo")) for n in names) + " |")
    lines += ["", "Commands:", ""] + [f"    {shlex.join(d['bench']['command'])}" for d in docs]
    lines += ["", json.dumps(summary)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clusters", default=",".join(CLUSTERS))
    ap.add_argument("--model", default="llama-30b")
    ap.add_argument("--workloads", default="conversation,coding")
    ap.add_argument("--only", choices=("headline", "sweep"), default=None)
    ap.add_argument("--sweep-cluster", default="paper-cloud-32")
    ap.add_argument("--tpot-scales", default="0.5,0.75,1.5", help="sweep: TPOT targets as multiples of the default")
    ap.add_argument("--budget", type=int, default=DEFAULT_MAX_EVALUATIONS, help="search budget (states scored)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per simulated run")
    ap.add_argument("--min-requests", type=int, default=600, help="at least this many requests per simulated run")
    ap.add_argument("--warmup", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify-top", type=int, default=0, help="every searching system re-scores its K best")
    ap.add_argument("--jobs", type=int, default=2, help="comparisons run in parallel (processes)")
    ap.add_argument("--no-curves", action="store_true", help="headline without the attainment-vs-rate curves")
    ap.add_argument("--out", help="write every comparison document and the summary to this JSON file")
    ap.add_argument("--plot-dir", help="write one plot per headline comparison here")
    ap.add_argument("--save-dir", help="write each comparison document here as soon as it is done")
    ap.add_argument("--from-dir", help="only print the tables (and plots) of the documents saved in this directory")
    ap.add_argument("--markdown", action="store_true", help="with --from-dir: also print the README tables")
    args = ap.parse_args()
    if args.from_dir:
        docs = [json.loads(p.read_text()) for p in sorted(Path(args.from_dir).glob("*.json"))]
        docs.sort(key=lambda d: (d["bench"]["kind"] != "headline", d["cluster"] != "paper-cloud-32", d["cluster"],
                                 d["workload"], d["bench"].get("tpot_scale") or 1))
        for doc in docs:
            if args.plot_dir and doc["bench"]["kind"] == "headline":
                plot_comparison(doc, Path(args.plot_dir) / f"compare_{short(doc['cluster'])}_{doc['workload']}.png")
        summary = print_tables(docs)
        if args.markdown:
            print(markdown(docs, summary))
        return
    if args.save_dir:
        Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(args)
    console.print(f"[dim]{len(jobs)} comparisons, {args.jobs} at a time[/dim]")
    docs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        for doc in pool.map(run_one, jobs):
            console.print(comparison_table(doc))
            console.print(f"[dim]{shlex.join(doc['bench']['command'])}  ({doc['bench']['wall_s']:.0f} s)[/dim]")
            if args.plot_dir and doc["bench"]["kind"] == "headline":
                plot_comparison(doc, Path(args.plot_dir) / f"compare_{short(doc['cluster'])}_{doc['workload']}.png")
            docs.append(doc)
    summary = print_tables(docs)
    if args.out:
        Path(args.out).write_text(json.dumps({"comparisons": docs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
