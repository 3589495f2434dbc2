"""Scheduler scaling benchmark: plan time and objective on generated clusters of 8 to 512 GPUs.

For each size, a heterogeneous cluster from `gen_cluster.py` (equal shares of RTX-3090Ti, A40, RTX-A6000
and L40S 4-GPU nodes, ~4 nodes per zone, 40 Gbps inside a zone, 5-10 Gbps between zones) is planned for
llama-30b on the conversation workload at the default SLO, and the table reports the decision time, tabu
iterations, the estimated max rate at the SLO, that rate per $/hour of the GPUs the plan uses, and the search
objective (routing-LP served rate) of the starting grouping and of the final plan.

    .venv/bin/python benchmarks/bench_scheduler.py                    # 8, 32, 128, 512 GPUs
    .venv/bin/python benchmarks/bench_scheduler.py --sizes 32 128 --workload coding --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_cluster import generate_cluster  # noqa: E402

from thunderserve.costmodel.reference import slo_from_scale  # noqa: E402
from thunderserve.plan import Phase  # noqa: E402
from thunderserve.scheduler import SchedulerConfig, plan_deployment  # noqa: E402
from thunderserve.scheduler.config import DEFAULT_MAX_EVALUATIONS  # noqa: E402
from thunderserve.spec import load_model, load_workload, resolve_cluster  # noqa: E402

DEFAULT_LIMITS_S = {8: 10.0, 32: 10.0, 128: 60.0, 512: 120.0}


def run(size: int, model: str, workload: str, time_limit_s: float | None, seed: int,
        budget: int = DEFAULT_MAX_EVALUATIONS) -> dict[str, object]:
    cluster = resolve_cluster(generate_cluster(size, seed=seed))
    m, w = load_model(model), load_workload(workload)
    slo = slo_from_scale(m, w, 5.0)
    t0 = time.monotonic()
    result = plan_deployment(cluster, m, w, slo, SchedulerConfig(time_limit_s=time_limit_s, max_evaluations=budget,
                                                                 seed=seed))
    wall = time.monotonic() - t0
    est = result.plan.estimate
    phases = {ph.value: len(result.plan.groups_in(ph)) for ph in Phase}
    return {
        "gpus": size, "time_limit_s": time_limit_s, "budget": budget, "evaluations": result.evaluations,
        "stopped_by": result.stopped_by, "plan_time_s": round(wall, 2), "iterations": result.iterations,
        "groups": len(result.plan.groups), "phases": phases, "gpus_used": len(result.plan.gpus),
        "max_rate_at_slo": round(float(est["max_rate_at_slo"]), 3),
        "cost_per_hour": round(float(est["cost_per_hour"]), 3),
        "cluster_cost_per_hour": round(cluster.cost_usd_per_hour, 3),
        "rate_per_dollar": round(float(est["rate_per_dollar"]), 4),
        "lp_start_rps": round(result.start_objective, 3),
        "lp_end_rps": round(float(est.get("lp_rate_rps", 0.0)), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--model", default="llama-30b")
    parser.add_argument("--workload", default="conversation")
    parser.add_argument("--time-limit", type=float, default=None, help="one wall-clock cap for every size (s)")
    parser.add_argument("--budget", type=int, default=DEFAULT_MAX_EVALUATIONS,
                        help="search budget (states scored); the default stopping rule, machine-independent")
    parser.add_argument("--caps", action="store_true", help="also cap each size at its DEFAULT_LIMITS_S time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    console = Console(stderr=True)
    for size in args.sizes:
        limit = args.time_limit or (DEFAULT_LIMITS_S.get(size, 60.0) if args.caps else None)
        console.print(f"planning {size} GPUs (budget {args.budget}, cap {limit} s) ...", highlight=False)
        rows.append(run(size, args.model, args.workload, limit, args.seed, args.budget))
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    table = Table(title=f"scheduler scaling: {args.model}, {args.workload}, default SLO (5x reference)")
    for col in ("GPUs", "budget/cap s", "plan s", "iters (stop)", "groups (p/d/c)", "max rate req/s", "$/hour",
                "req/s per $/h", "LP start -> end"):
        table.add_column(col, justify="right")
    for r in rows:
        ph = r["phases"]
        assert isinstance(ph, dict)
        limit = r["time_limit_s"]
        table.add_row(str(r["gpus"]), f"{r['budget']}/{limit or '-'}", f"{r['plan_time_s']:.1f}",
                      f"{r['iterations']} ({r['stopped_by']})",
                      f"{r['groups']} ({ph['prefill']}/{ph['decode']}/{ph['colocated']})",
                      f"{r['max_rate_at_slo']:.2f}", f"{r['cost_per_hour']:.2f}", f"{r['rate_per_dollar']:.3f}",
                      f"{r['lp_start_rps']:.2f} -> {r['lp_end_rps']:.2f}")
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
