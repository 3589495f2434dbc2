"""`thunderserve replan`: the re-scheduling decision offline (lightweight, and optionally the full search)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from thunderserve.cli.common import (
    AttainOpt,
    ClusterOpt,
    JsonOpt,
    ModelOpt,
    SloScaleOpt,
    TpotOpt,
    TtftOpt,
    WorkloadOpt,
    console,
    load_inputs,
    out,
    print_json,
)
from thunderserve.plan import load_plan, validate_plan
from thunderserve.resched import EventKind, ReplanResult, cluster_without, failed_gpus, parse_event
from thunderserve.resched.events import cluster_with_added, event_workload
from thunderserve.resched.replan import full_replan, lightweight_replan


def replan(
    cluster: str = ClusterOpt,
    model: str = ModelOpt,
    workload: str = WorkloadOpt,
    plan: Path = typer.Option(..., "--plan", help="The running plan (JSON)"),
    event: str = typer.Option(..., "--event", help="fail:NODE | fail:NODE:INDEX | add:NODE.yaml | workload:NAME|CSV"),
    full: bool = typer.Option(False, "--full", help="Also run the full two-level search for comparison"),
    time_limit: float = typer.Option(10.0, "--time-limit", help="Time limit of the full search (s)"),
    slo: float | None = SloScaleOpt,
    ttft_ms: float | None = TtftOpt,
    tpot_ms: float | None = TpotOpt,
    attainment: float = AttainOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Decide how to re-plan after an event, as the running service would."""
    inputs = load_inputs(cluster, model, workload, slo, ttft_ms, tpot_ms, attainment)
    current = load_plan(plan)
    validate_plan(current, inputs.cluster, inputs.model, require_routing=False)
    ev = parse_event(event)
    new_cluster, new_workload = inputs.cluster, inputs.workload
    if ev.kind is EventKind.FAIL:
        new_cluster = cluster_without(inputs.cluster, failed_gpus(inputs.cluster, ev))
    elif ev.kind is EventKind.ADD:
        assert ev.add_path is not None
        new_cluster = cluster_with_added(inputs.cluster, ev.add_path)
    else:
        new_workload = event_workload(ev)
    added = frozenset(new_cluster.by_id) - frozenset(inputs.cluster.by_id)
    light = lightweight_replan(current, new_cluster, inputs.model, new_workload, inputs.slo, added_gpus=added)
    result = {"event": ev.describe(), "lightweight": light.to_dict()}
    heavy: ReplanResult | None = None
    if full:
        from thunderserve.scheduler import SchedulerConfig

        cfg = SchedulerConfig(time_limit_s=time_limit, kv_compression=current.kv_transfer.compression)
        with console.status("full two-level search..."):
            heavy = full_replan(current, new_cluster, inputs.model, new_workload, inputs.slo, cfg)
        result["full"] = heavy.to_dict()
    if as_json:
        print_json(result)
        return
    table = Table(title=f"re-plan after {ev.describe()}")
    for col in ("path", "decision time (s)", "max rate at SLO (req/s)", "apply time (s)", "reloads weights"):
        table.add_column(col)
    for name, r in (("lightweight", light), ("full", heavy)):
        if r is not None:
            table.add_row(name, f"{r.decision_time_s:.3f}", f"{r.max_rate_at_slo:.2f}", f"{r.apply_time_s:.1f}",
                          "yes" if any(c.reloads_weights for c in r.changes) else "no")
    out.print(table)
    for c in light.changes:
        out.print(f"  {c.kind:9s} {c.group or '-':6s} {c.detail}")


def register(app: typer.Typer) -> None:
    app.command("replan")(replan)
