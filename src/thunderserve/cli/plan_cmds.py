"""`plan` and `evaluate`: run the two-level planner and score plans.

Thin wrappers over `thunderserve.scheduler`. Human-readable tables go to stdout (to stderr when `--json`
owns stdout); the search's progress bar goes to stderr.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from thunderserve.cli.common import (
    AttainOpt,
    BudgetOpt,
    ClusterOpt,
    Inputs,
    JsonOpt,
    ModelOpt,
    SloScaleOpt,
    TimeCapOpt,
    TpotOpt,
    TtftOpt,
    WorkloadOpt,
    console,
    load_inputs,
    out,
    print_json,
)
from thunderserve.costmodel.comm import Compression
from thunderserve.errors import PlanError, SpecError, ThunderServeError

if TYPE_CHECKING:  # the rest loads when a command runs, not for --help (no scipy, networkx or numpy then)
    from thunderserve.plan import Plan
    from thunderserve.quality.gate import GateResults, GateVerdict
    from thunderserve.scheduler.config import PlanResult, SchedulerConfig
    from thunderserve.spec.cluster import Cluster

RateOpt = typer.Option(None, "--rate", help="Request rate (req/s) to report attainment at (default: the max rate)")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise SpecError(f"must be positive, got {value}", field=name)


KvCompressionOpt = typer.Option("auto", "--kv-compression", help="KV transfer compression: auto (the most "
                                "compressed level that passes the KV quality gate for the model; int8 when no gate "
                                "results are stored) or none|int8|int4 (forced, even when it fails the gate)")
KvGateOpt = typer.Option(None, "--kv-gate", help="Gate results for the model (a `bench-kv --json` file); default: "
                         "the results the package ships for it")


ENGINES = ("builtin", "vllm")
EngineOpt = typer.Option("builtin", "--engine", help="Engine the plan will be served on: builtin (KV compressed "
                         "as planned) or vllm (its KV connector moves caches uncompressed, so the plan is costed "
                         "with none)")


def resolve_kv_compression(requested: str, model: str, gate_file: Path | None, engine: str = "builtin"
                           ) -> tuple[GateVerdict, bool]:
    """The level to plan with and its gate verdict, and whether the user forced it (`quality.gate`). On vLLM
    (`engine="vllm"`) the level is `none`: NixlConnector sends the cache as it is, and the plan must be costed
    with the bytes that really cross the links."""
    from thunderserve.quality.gate import LEVELS, choose_level, load_results

    req = requested.strip().lower()
    if req != "auto" and req not in LEVELS:
        known = ", ".join(("auto", *LEVELS))
        raise SpecError(f"unknown compression '{requested}' (known: {known})", field="--kv-compression")
    if engine not in ENGINES:
        raise SpecError(f"unknown engine '{engine}' (known: {', '.join(ENGINES)})", field="--engine")
    forced = req != "auto"
    if engine == "vllm":  # none is what the engine does, not the user's choice
        if req not in ("auto", "none"):
            raise SpecError(f"{req} cannot be served on vLLM: its KV connector sends caches uncompressed (use none "
                            "or auto)", field="--kv-compression")
        req, forced = "none", False
    results = load_results(gate_file) if gate_file is not None else None
    return choose_level(req, model, results), forced


def kv_alternatives(requested: str, model: str, results: GateResults | None, engine: str = "builtin"
                    ) -> tuple[Compression, ...]:
    """The levels the planner may finish with under `auto` on the built-in engine: every level the gate allows
    (the search runs at the most compressed; `SchedulerConfig.kv_alternatives`). Nothing when a level is forced
    or the engine fixes it."""
    from thunderserve.quality.gate import allowed_levels

    if requested.strip().lower() != "auto" or engine != "builtin":
        return ()
    return tuple(Compression(lv) for lv in allowed_levels(model, results))


def chosen_verdict(plan: Plan, verdict: GateVerdict, model: str, results: GateResults | None) -> GateVerdict:
    """The gate verdict of the level the plan ended with (the planner may keep a less compressed one)."""
    if str(plan.kv_transfer.compression) == verdict.level:
        return verdict
    from thunderserve.quality.gate import gate_verdict

    return gate_verdict(model, str(plan.kv_transfer.compression), results)


@contextmanager
def search_progress(enabled: bool = True) -> Iterator[Callable[[float], None]]:
    """A rich progress bar on stderr; yields the callback the planner reports its fraction done to."""
    progress = Progress(TextColumn("planning"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                        TimeElapsedColumn(), console=console, transient=True,
                        disable=not (enabled and console.is_terminal))
    with progress:
        task = progress.add_task("plan", total=1.0)
        yield lambda fraction: progress.update(task, completed=min(max(fraction, 0.0), 1.0))


# ------------------------------------------------------------------ rendering


def _layout(group: Any, cluster: Cluster) -> str:
    parts = []
    for st in group.stages:
        gpu = cluster.by_id[st.gpus[0]]
        nodes = sorted({cluster.by_id[g].node for g in st.gpus})
        parts.append(f"TP{st.tp} {gpu.spec.name}@{'+'.join(nodes)} L{st.layers[0]}-{st.layers[1] - 1}")
    return " -> ".join(parts)


def plan_table(plan: Plan, cluster: Cluster) -> Table:
    """Groups with phase, GPUs, layout (TP per stage, PP, layer split) and routing shares."""
    table = Table(title=f"plan for {plan.model} on {plan.cluster} (KV transfer {plan.kv_transfer.compression})")
    for col in ("group", "phase", "GPUs", "$/h", "layout (TP x PP, layers)", "entry", "KV to"):
        table.add_column(col, overflow="fold")
    routing = plan.routing
    for g in plan.groups:
        types: dict[str, int] = {}
        for x in g.gpus:
            types[cluster.by_id[x].spec.name] = types.get(cluster.by_id[x].spec.name, 0) + 1
        gpus = " + ".join(f"{n}x{t}" for t, n in sorted(types.items()))
        price = sum(cluster.by_id[x].price_usd_per_hour for x in g.gpus)
        entry = f"{routing.entry.get(g.id, 0.0):.1%}" if routing and g.id in routing.entry else ""
        kv = ", ".join(f"{d} {s:.0%}" for d, s in sorted(routing.kv.get(g.id, {}).items())) if routing else ""
        table.add_row(g.id, g.phase.value, gpus, f"{price:.2f}", f"PP{g.pp}: {_layout(g, cluster)}", entry, kv)
    return table


def _fmt(value: Any, unit: str = "", scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value * scale:.{digits}f}{unit}"


def estimate_lines(est: dict[str, Any]) -> list[str]:
    return [
        f"estimated max rate at SLO: {_fmt(est.get('max_rate_at_slo'), ' req/s')} "
        f"(attainment target {_fmt(est.get('attainment_target'), '%', 100, 0)})",
        f"at {_fmt(est.get('rate_rps'), ' req/s')}: attainment {_fmt(est.get('slo_attainment'), '%', 100, 1)}, "
        f"TTFT p90 {_fmt(est.get('ttft_p90_s'), ' ms', 1e3, 0)} (target {_fmt(est.get('ttft_target_s'), ' ms', 1e3, 0)}),"
        f" mean TPOT {_fmt(est.get('tpot_mean_s'), ' ms', 1e3, 0)} (target {_fmt(est.get('tpot_target_s'), ' ms', 1e3, 0)})",
        f"cost: ${_fmt(est.get('cost_per_hour'))}/hour -> {_fmt(est.get('rate_per_dollar'), ' req/s per $/hour', 1, 3)}",
    ]


def print_plan_summary(plan: Plan, cluster: Cluster, to_stderr: bool = False,
                       result: PlanResult | None = None) -> None:
    from thunderserve.quality.gate import gate_line

    con = console if to_stderr else out
    con.print(plan_table(plan, cluster))
    line = gate_line(plan)
    if line is not None:
        con.print(line, soft_wrap=True, highlight=False)
    for line in estimate_lines(plan.estimate):
        con.print(line, soft_wrap=True, highlight=False)
    if not plan.estimate.get("max_rate_at_slo"):
        con.print("warning: no request rate meets the SLO on this cluster; loosen --slo (or --ttft-ms/--tpot-ms)",
                  soft_wrap=True, highlight=False)
    if result is not None:
        con.print(f"search: {result.iterations} tabu iterations in {result.decision_time_s:.1f} s", highlight=False)
        if result.verified:
            rows = ", ".join(f"{e:.2f} -> {v:.2f}" for e, v in result.verified)
            con.print(f"verified by simulation (estimated -> simulated max rate, req/s): {rows}; kept "
                      f"{plan.estimate.get('verified_max_rate_rps', 0):.2f}", soft_wrap=True, highlight=False)


# ------------------------------------------------------------------ commands


def run_plan(inputs: Inputs, config: SchedulerConfig, rate_rps: float | None = None,
             show_progress: bool = True) -> PlanResult:
    """Plan with a progress bar on stderr; with `config.verify_top` > 1 the top candidates are re-scored by
    simulation (`sim.rescore`)."""
    rescore = None
    if config.verify_top > 1:
        from thunderserve.sim import rescorer

        def tick(done: int, total: int) -> None:
            if show_progress:
                console.print(f"verified {done}/{total} candidates by simulation", highlight=False)

        rescore = rescorer(inputs.cluster, inputs.model, inputs.workload, inputs.slo, progress=tick)
    from thunderserve.scheduler.planner import plan_deployment

    with search_progress(show_progress) as progress:
        return plan_deployment(inputs.cluster, inputs.model, inputs.workload, inputs.slo, config, rate_rps,
                               progress, rescore)


def plan_cmd(
    cluster: str = ClusterOpt,
    model: str = ModelOpt,
    workload: str = WorkloadOpt,
    rate: float | None = RateOpt,
    slo: float | None = SloScaleOpt,
    ttft_ms: float | None = TtftOpt,
    tpot_ms: float | None = TpotOpt,
    attainment: float = AttainOpt,
    budget: int = BudgetOpt,
    time_limit: float | None = TimeCapOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the tabu search (same seed, same plan)"),
    kv_compression: str = KvCompressionOpt,
    kv_gate: Path | None = KvGateOpt,
    engine: str = EngineOpt,
    verify_top: int = typer.Option(0, "--verify-top", help="Re-score the K best candidates (distinct parallel "
                                   "shapes first) by simulation and keep the best simulated one (0: off)"),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write the plan JSON here"),
    as_json: bool = JsonOpt,
) -> None:
    """Plan groups, phases, parallel layouts and routing for a cluster, model, workload and SLO."""
    _positive("--rate", rate)
    _positive("--time-limit", time_limit)
    _positive("--budget", budget)
    if verify_top < 0:
        raise SpecError(f"must be 0 or more, got {verify_top}", field="--verify-top")
    inputs = load_inputs(cluster, model, workload, slo, ttft_ms, tpot_ms, attainment)
    verdict, forced = resolve_kv_compression(kv_compression, inputs.model.name, kv_gate, engine.strip().lower())
    from thunderserve.quality.gate import load_results, stamp_plan
    from thunderserve.scheduler.config import SchedulerConfig

    results = load_results(kv_gate) if kv_gate is not None else None  # read (and checked) above: exists
    config = SchedulerConfig(time_limit_s=time_limit, max_evaluations=budget, seed=seed,
                             kv_compression=Compression(verdict.level), verify_top=verify_top,
                             kv_alternatives=kv_alternatives(kv_compression, inputs.model.name, results,
                                                             engine.strip().lower()))
    result = run_plan(inputs, config, rate)
    verdict = chosen_verdict(result.plan, verdict, inputs.model.name, results)
    result = replace(result, plan=stamp_plan(result.plan, verdict, forced))
    if output is not None:
        try:
            output.write_text(result.plan.to_json() + "\n")
        except OSError as exc:
            raise SpecError(f"cannot write plan ({exc.strerror})", source=str(output)) from None
    print_plan_summary(result.plan, inputs.cluster, to_stderr=as_json, result=result)
    if output is not None:
        (console if as_json else out).print(f"plan written to {output}")
    if as_json:
        print_json(result.plan.to_dict())


def _read_plan_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        raise PlanError(f"{path}: file not found") from None
    except OSError as exc:
        raise PlanError(f"{path}: cannot read file ({exc.strerror})") from None


def _score_line(line: str, where: str, inputs: Inputs, rate: float | None) -> dict[str, Any]:
    from thunderserve.plan import plan_from_dict
    from thunderserve.scheduler.api import evaluate_plan

    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return {"feasible": False, "reason": f"{where}: malformed JSON: {exc.msg}"}
    try:
        plan = plan_from_dict(data, where)
        return evaluate_plan(plan, inputs.cluster, inputs.model, inputs.workload, inputs.slo, rate)
    except ThunderServeError as exc:
        msg = str(exc)
        return {"feasible": False, "reason": msg if msg.startswith(where) else f"{where}: {msg}"}


def evaluate_cmd(
    cluster: str = ClusterOpt,
    model: str = ModelOpt,
    workload: str = WorkloadOpt,
    plan: Path | None = typer.Option(None, "--plan", help="Plan JSON to score"),
    plans: Path | None = typer.Option(None, "--plans", help="JSONL file of plans, one per line, scored in order"),
    rate: float | None = RateOpt,
    slo: float | None = SloScaleOpt,
    ttft_ms: float | None = TtftOpt,
    tpot_ms: float | None = TpotOpt,
    attainment: float = AttainOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Score plans with the analytic estimate (routing is solved when a plan has none)."""
    _positive("--rate", rate)
    if (plan is None) == (plans is None):
        raise SpecError("give exactly one of --plan FILE or --plans FILE.jsonl", field="--plan")
    inputs = load_inputs(cluster, model, workload, slo, ttft_ms, tpot_ms, attainment)
    if plans is not None:
        for i, line in enumerate(_read_plan_lines(plans), start=1):
            if not line.strip():
                continue
            result = _score_line(line, f"{plans}:{i}", inputs, rate)
            if as_json:
                out.file.write(json.dumps(result) + "\n")
            else:
                out.print(_one_line(f"{plans}:{i}", result), soft_wrap=True, highlight=False)
        return
    assert plan is not None
    from thunderserve.plan import load_plan
    from thunderserve.scheduler.api import evaluate_plan

    loaded = load_plan(plan)

    try:
        scored = evaluate_plan(loaded, inputs.cluster, inputs.model, inputs.workload, inputs.slo, rate)
    except ThunderServeError as exc:
        raise PlanError(f"{plan}: {exc}") from None
    if as_json:
        print_json(scored)
        return
    out.print(plan_table(loaded, inputs.cluster))
    for line in estimate_lines(scored):
        out.print(line, soft_wrap=True, highlight=False)


def _one_line(where: str, result: dict[str, Any]) -> str:
    if not result.get("feasible"):
        return f"{where}: infeasible: {result.get('reason')}"
    return (f"{where}: max rate {result['max_rate_at_slo']:.2f} req/s, attainment "
            f"{result['slo_attainment']:.1%} at {result['rate_rps']:.2f} req/s, ${result['cost_per_hour']:.2f}/h")


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)
    app.command("evaluate")(evaluate_cmd)
