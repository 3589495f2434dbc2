"""Planner estimate vs simulator: the analytic max rate at the SLO against the simulated one, for the plan
ThunderServe's planner makes, on paper-cloud-32 (coding, conversation) and on generated clusters
(`gen_cluster.py`). Target (issue 11): within 10% of the simulated rate. Prints a table (`--json` for rows).

    .venv/bin/python benchmarks/bench_agreement.py [--generated 32:1 48:2] [--save-plans DIR]

Plans come from the planner's default work budget (deterministic for the seed), not a wall-clock limit.
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

from thunderserve.cli.common import make_slo  # noqa: E402
from thunderserve.scheduler import SchedulerConfig, estimate_max_rate, plan_deployment  # noqa: E402
from thunderserve.sim import max_rate_at_slo  # noqa: E402
from thunderserve.spec import load_cluster, load_model, load_workload, resolve_cluster  # noqa: E402


def run(name: str, cluster_src: object, model: str, workload: str, time_limit_s: float | None, seed: int,
        plan_dir: Path | None = None) -> dict[str, object]:
    cluster = load_cluster(cluster_src) if isinstance(cluster_src, str) else resolve_cluster(cluster_src)
    m, w = load_model(model), load_workload(workload)
    slo = make_slo(m, w, None, None, None, 0.9)
    plan = plan_deployment(cluster, m, w, slo, SchedulerConfig(time_limit_s=time_limit_s, seed=seed)).plan
    if plan_dir is not None:
        (plan_dir / f"{name}-{workload}.json").write_text(json.dumps(plan.to_dict(), indent=1))
    est = estimate_max_rate(plan, cluster, m, w, slo)
    t0 = time.perf_counter()
    sim = max_rate_at_slo(plan, cluster, m, w, slo, rate_hint_rps=est).rate_rps
    groups = "/".join(str(sum(1 for g in plan.groups if g.phase.value == ph))
                      for ph in ("prefill", "decode", "colocated"))
    return {"cluster": name, "workload": workload, "groups_pdc": groups, "estimate_rps": round(est, 3),
            "simulated_rps": round(sim, 3), "error": round((est - sim) / sim, 4) if sim > 0 else None,
            "sim_wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-30b")
    ap.add_argument("--workloads", nargs="+", default=["coding", "conversation"])
    ap.add_argument("--generated", nargs="*", default=["32:1", "48:2"], help="GPUS:SEED generated clusters")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="optional planner wall-clock cap per plan (s); default: the planner's work budget only")
    ap.add_argument("--save-plans", type=Path, help="directory to write the plans to")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cases: list[tuple[str, object, str]] = [("paper-cloud-32", "paper-cloud-32", w) for w in args.workloads]
    for spec in args.generated:
        size, seed = (int(x) for x in spec.split(":"))
        cases.append((f"gen-{size}-s{seed}", generate_cluster(size, seed=seed), "conversation"))
    console = Console(stderr=True)
    rows = []
    for name, src, wl in cases:
        console.print(f"{name} / {wl}: planning and simulating ...", highlight=False)
        rows.append(run(name, src, args.model, wl, args.time_limit, 0, args.save_plans))
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    table = Table(title=f"estimate vs simulated max rate at the SLO: {args.model}, default SLO")
    for col in ("cluster", "workload", "groups p/d/c", "estimate req/s", "simulated req/s", "error", "sim s"):
        table.add_column(col, justify="right")
    for r in rows:
        err = r["error"]
        table.add_row(str(r["cluster"]), str(r["workload"]), str(r["groups_pdc"]), f"{r['estimate_rps']:.3f}",
                      f"{r['simulated_rps']:.3f}", "-" if err is None else f"{float(err):+.1%}",
                      f"{r['sim_wall_s']:.0f}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
