"""Simulator speed: one hour of the Azure conversation trace at 10x its rate (~194,000 requests) on
paper-cloud-32 with ThunderServe's plan, llama-30b. Prints requests simulated per second.

The shipped trace covers one hour at ~5.4 req/s; at 10x its timestamps span 6 minutes, so the hour is that
compressed trace replayed back to back ten times (`--repeat`). Usage:
    .venv/bin/python benchmarks/bench_sim.py [--plan plan.json] [--rate-scale 10] [--repeat 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from thunderserve.cli.common import make_slo
from thunderserve.plan import load_plan
from thunderserve.sim import compute_metrics, simulate
from thunderserve.spec import load_cluster, load_model, load_workload


def tiled_trace(rate_scale: float, repeat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trace compressed by `rate_scale`, replayed `repeat` times back to back."""
    t, p, o = load_workload("conversation").trace_requests(rate_scale=rate_scale)
    span = float(t[-1]) + float(np.mean(np.diff(t)))
    times = np.concatenate([t + k * span for k in range(repeat)])
    return times, np.tile(p, repeat), np.tile(o, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan", help="plan JSON (default: plan with ThunderServe's planner, 10 s)")
    ap.add_argument("--cluster", default="paper-cloud-32")
    ap.add_argument("--model", default="llama-30b")
    ap.add_argument("--rate-scale", type=float, default=10.0)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    cluster, model = load_cluster(args.cluster), load_model(args.model)
    workload = load_workload("conversation")
    slo = make_slo(model, workload, None, None, None, 0.9)
    if args.plan:
        plan = load_plan(args.plan)
    else:
        from thunderserve.scheduler import plan_deployment

        plan = plan_deployment(cluster, model, workload, slo).plan
    requests = tiled_trace(args.rate_scale, args.repeat)
    t0 = time.perf_counter()
    result = simulate(plan, cluster, model, *requests)
    wall = time.perf_counter() - t0
    m = compute_metrics(result, slo)
    table = Table(title=f"simulator speed: {args.model} on {args.cluster}, conversation x{args.rate_scale:g}")
    for col in ("requests", "arrival span (s)", "virtual end (s)", "events", "wall (s)", "requests/s",
                "events/s", "attainment"):
        table.add_column(col, justify="right")
    n = result.num_requests
    table.add_row(f"{n:,}", f"{requests[0][-1]:.0f}", f"{result.end_s:.0f}", f"{result.events:,}", f"{wall:.1f}",
                  f"{n / wall:,.0f}", f"{result.events / wall:,.0f}", f"{m.slo_attainment:.1%}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
