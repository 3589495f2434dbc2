"""`demo`: the main job on the built-in scenario, end to end.

Plans paper-cloud-32 (llama-30b, conversation, default SLO) with ThunderServe, then simulates that plan next to
every baseline on the same GPUs and on the in-house cluster of equal cost (inhouse-8xa100), prints the plan and
the comparison table, and writes the plan, the comparison plot (attainment against rate and against SLO scale)
and a Markdown report into `--out-dir`. `--plan-only` stops after the plan.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from thunderserve.cli.common import JsonOpt, console, load_inputs, out, print_json
from thunderserve.cli.plan_cmds import (
    KvCompressionOpt,
    KvGateOpt,
    print_plan_summary,
    resolve_kv_compression,
    run_plan,
)
from thunderserve.costmodel.comm import Compression
from thunderserve.errors import SpecError
from thunderserve.plan import Plan
from thunderserve.quality.gate import stamp_plan
from thunderserve.report.systems import PlanKnobs
from thunderserve.scheduler import SchedulerConfig
from thunderserve.sim.config import LoadConfig, SimConfig
from thunderserve.spec.cluster import Cluster, load_cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

DEMO_CLUSTER = "paper-cloud-32"
DEMO_BASELINE_CLUSTER = "inhouse-8xa100"
DEMO_MODEL = "llama-30b"
DEMO_WORKLOAD = "conversation"
DEMO_DURATION_S = 300.0  # seconds of Poisson arrivals per simulated run (the compare default is 600)


def demo_cmd(
    time_limit: float = typer.Option(10.0, "--time-limit", help="Seconds each planner's search may run"),
    out_dir: Path = typer.Option(Path("thunderserve-demo"), "--out-dir",
                                 help="Where plan.json, compare.png and report.md are written"),
    duration: float = typer.Option(DEMO_DURATION_S, "--duration", help="Seconds of arrivals per simulated run"),
    plan_only: bool = typer.Option(False, "--plan-only", help="Only plan (no simulation or comparison)"),
    kv_compression: str = KvCompressionOpt,
    kv_gate: Path | None = KvGateOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Plan paper-cloud-32 (llama-30b, conversation), simulate it, and compare with the baselines."""
    from thunderserve.report import (
        CompareConfig,
        comparison_table,
        plot_comparison,
        run_comparison,
        write_markdown,
    )
    from thunderserve.report.compare import system_names
    from thunderserve.report.systems import THUNDERSERVE, system

    for name, value in (("--time-limit", time_limit), ("--duration", duration)):
        if not value > 0:
            raise SpecError("must be positive", field=name)
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError(f"{out_dir} exists and is not a directory", field="--out-dir")
    inputs = load_inputs(DEMO_CLUSTER, DEMO_MODEL, DEMO_WORKLOAD)
    verdict, forced = resolve_kv_compression(kv_compression, inputs.model.name, kv_gate)
    result = run_plan(inputs, SchedulerConfig(time_limit_s=time_limit, kv_compression=Compression(verdict.level)))
    plan = stamp_plan(result.plan, verdict, forced)
    print_plan_summary(plan, inputs.cluster, to_stderr=as_json, result=result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(plan.to_json())
    doc: dict[str, Any] | None = None
    if not plan_only:
        config = CompareConfig(load=LoadConfig(duration_s=duration), planner_time_limit_s=time_limit,
                               per_kv_level=False, kv_compression=Compression(verdict.level))
        specs = {n: system(n, inputs.model) for n in system_names(config, inputs.model)}
        estimate = dict(plan.estimate)
        estimate.setdefault("planner_max_rate_rps", result.max_rate_at_slo)
        planned = plan.model_copy(update={"estimate": estimate})

        def thunderserve(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                         knobs: PlanKnobs, sim: SimConfig, memo: dict[Any, Plan]) -> Plan:
            if cluster.name != inputs.cluster.name:
                return system(THUNDERSERVE).plan(cluster, model, workload, slo, knobs, sim, memo)
            return planned  # planned above on this very scenario: no second search

        specs[THUNDERSERVE] = replace(specs[THUNDERSERVE], plan=thunderserve)
        with console.status("") as status:
            def tick(done: int, total: int, what: str) -> None:
                status.update(f"[{done}/{total}] {what}")

            doc = run_comparison(inputs.cluster, inputs.model, inputs.workload, inputs.slo,
                                 baseline_cluster=load_cluster(DEMO_BASELINE_CLUSTER), config=config,
                                 specs=specs, progress=tick)
        plot_comparison(doc, out_dir / "compare.png")
        write_markdown(doc, out_dir / "report.md", out_dir / "compare.png")
        (console if as_json else out).print(comparison_table(doc))
    (console if as_json else out).print(f"written: {', '.join(str(p) for p in sorted(out_dir.iterdir()))}",
                                        soft_wrap=True, highlight=False)
    if as_json:
        print_json({"plan": plan.to_dict(), "comparison": doc, "out_dir": str(out_dir)})


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)
