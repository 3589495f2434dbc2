"""Rescheduling in the simulator: the issue's done-when checks on paper-cloud-32 (llama-30b), as tables.

  (i)   coding -> conversation shift at half time, at 70% of a fresh conversation plan's simulated max rate:
        lightweight restores the attainment target within 60 s of detection, and ends with >= 90% of the
        fresh conversation plan's final-window attainment;
  (ii)  node failure (fail:n3) at half time, at 70% of a fresh plan's max rate on the surviving GPUs:
        lightweight's final-window attainment >= 90% of that fresh plan's;
  (iii) steady load for 30 simulated minutes: no re-plan (lightweight and full policies).
Each scenario compares the none / lightweight / full policies on one request stream (see sim.timeline and
sim.resched_scenarios for the modelling). Plans use an iteration budget (deterministic), decisions a fixed
time (lightweight 0.5 s, full 10 s; the measured wall-clock times are printed too).

Usage:
    .venv/bin/python benchmarks/bench_resched.py [--plot-dir out/] [--seeds 0,1,2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from thunderserve.cli.common import make_slo
from thunderserve.report.timeline import checks_table, plot_timeline, timeline_table
from thunderserve.sim.resched_scenarios import (
    Planner,
    ScenarioConfig,
    ScenarioResult,
    failure_scenario,
    shift_scenario,
    steady_scenario,
)
from thunderserve.spec import load_cluster, load_model, load_workload

console = Console()
err = Console(stderr=True)


def show(res: ScenarioResult, plot_dir: Path | None, seed: int) -> None:
    console.rule(f"{res.name}: {res.rate_rps:.2f} req/s = {res.rate_basis}")
    for k, v in res.facts.items():
        console.print(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    console.print(timeline_table(res.doc))
    walls = [(name, r["decision_time_s"], r["decision_wall_s"]) for name, p in res.doc["policies"].items()
             for r in p["replans"]]
    if walls:
        console.print("  decision times used (s) / measured wall-clock (s): " + ", ".join(
            f"{n} {d:.2f}/{w:.3f}" for n, d, w in walls))
    console.print(checks_table(res.checks))
    if plot_dir is not None:
        name = res.name.replace(" ", "_").replace(">", "").replace(":", "_").replace("(", "").replace(")", "")
        path = plot_timeline(res.doc, plot_dir / f"resched_{name}_seed{seed}.png", res.checks)
        console.print(f"  plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="paper-cloud-32")
    ap.add_argument("--model", default="llama-30b")
    ap.add_argument("--node", default="n3", help="node that fails in (ii)")
    ap.add_argument("--fail-workloads", default="conversation,coding", help="workloads of the failure scenario")
    ap.add_argument("--rate-fraction", type=float, default=0.7)
    ap.add_argument("--duration", type=float, default=1200.0)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the request streams")
    ap.add_argument("--plot-dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true", help="print every scenario's document as JSON")
    args = ap.parse_args()
    cluster, model = load_cluster(args.cluster), load_model(args.model)
    coding, conversation = load_workload("coding"), load_workload("conversation")
    slo = make_slo(model, coding, None, None, None, 0.9)
    console.print(f"SLO (5x reference latency of coding, fixed for every run): TTFT {slo.ttft_ms:.0f} ms, "
                  f"TPOT {slo.tpot_ms:.0f} ms, attainment target {slo.attainment_target:.0%}")
    base = ScenarioConfig(rate_fraction=args.rate_fraction, duration_s=args.duration)
    planner = Planner(model, slo, base.scheduler)
    results: list[tuple[int, ScenarioResult]] = []
    t0 = time.perf_counter()
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = replace(base, seed=seed)
        err.print(f"seed {seed}: shift scenario ...")
        shift = shift_scenario(cluster, model, slo, coding, conversation, cfg, planner)
        results.append((seed, shift))
        for name in (w.strip() for w in args.fail_workloads.split(",") if w.strip()):
            err.print(f"seed {seed}: failure scenario ({name}) ...")
            wl = {"coding": coding, "conversation": conversation}.get(name) or load_workload(name)
            results.append((seed, failure_scenario(cluster, model, slo, wl, args.node, cfg, planner)))
        for wl in (coding, conversation):
            err.print(f"seed {seed}: steady {wl.name} ...")
            results.append((seed, steady_scenario(cluster, model, slo, wl, shift.rate_rps, cfg, planner)))
    if args.json:
        out: list[dict[str, Any]] = [{"seed": s, "scenario": r.name, "rate_rps": r.rate_rps, "rate_basis": r.rate_basis,
                                      "facts": r.facts, "checks": r.checks, "timeline": r.doc} for s, r in results]
        sys.stdout.write(json.dumps(out, indent=1, default=str) + "\n")
        return
    for seed, res in results:
        console.print(f"[bold]seed {seed}[/bold]")
        show(res, args.plot_dir, seed)
    summary = Table(title=f"done-when checks on {args.cluster} ({args.model}), "
                          f"{time.perf_counter() - t0:.0f} s wall")
    for col in ("seed", "scenario", "rate (req/s)", "check", "measured", "target", "result"):
        summary.add_column(col)
    for seed, res in results:
        for c in res.checks:
            m = c["measured"]
            summary.add_row(str(seed), res.name, f"{res.rate_rps:.2f}", c["name"],
                            f"{m:.3f}" if isinstance(m, float) else str(m), c["target"],
                            {True: "pass", False: "FAIL", None: "n/a"}[c["ok"]])
    console.print(summary)


if __name__ == "__main__":
    main()
