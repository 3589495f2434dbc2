"""`simulate` and `compare`: replay a workload against a plan, and ThunderServe vs the baselines side by side.

Thin wrappers: `thunderserve.sim` does the simulation, `thunderserve.report` the comparison, table, plot and
Markdown report. Progress bars go to stderr; `--json` prints the machine-readable document on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from thunderserve.cli.common import (
    AttainOpt,
    BudgetOpt,
    ClusterOpt,
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
from thunderserve.cli.plan_cmds import KvCompressionOpt, KvGateOpt, resolve_kv_compression
from thunderserve.costmodel.comm import Compression
from thunderserve.errors import SpecError
from thunderserve.plan import load_plan
from thunderserve.policy.batching import (
    DEFAULT_CHUNK_TOKEN_BUDGET,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_PREFILL_TOKEN_BUDGET,
    BatchingConfig,
)
from thunderserve.policy.step import ColocatedPolicy
from thunderserve.sim.config import (
    DEFAULT_DURATION_S,
    DEFAULT_MIN_REQUESTS,
    DEFAULT_WARMUP_S,
    LoadConfig,
    SimConfig,
)
from thunderserve.spec.cluster import load_cluster

DurationOpt = typer.Option(DEFAULT_DURATION_S, "--duration",
                           help="Seconds of Poisson arrivals per simulated run (trace: keep its first S seconds)")
WarmupOpt = typer.Option(DEFAULT_WARMUP_S, "--warmup", help="Arrivals in the first S seconds are not measured")
SeedOpt = typer.Option(0, "--seed", help="Seed of the Poisson arrivals and length sampling")
# vLLM's scheduler knobs under vLLM's names. Defaults are the simulator's (policy.batching), which match vLLM v1's
# OpenAI-server defaults on A100-class and smaller GPUs (max_num_batched_tokens 2048, max_num_seqs 256, chunked
# prefill on); vLLM raises them to 8192 / 1024 on >= 70 GiB GPUs other than the A100 (H100, MI300X): pass them.
ChunkedPrefillOpt = typer.Option(None, "--enable-chunked-prefill/--no-enable-chunked-prefill",
                                 help="Colocated groups mix prefill chunks into decode steps (vLLM v1 default: on); "
                                 "off: whole prefills pause decoding (older vLLM)")
PrefillFirstOpt = typer.Option(False, "--prefill-first", help="Alias of --no-enable-chunked-prefill")
MaxBatchedTokensOpt = typer.Option(None, "--max-num-batched-tokens", min=1,
                                   help=f"Tokens per step: the chunk budget of a mixed step and the prompt budget "
                                   f"of a prefill batch (default {DEFAULT_CHUNK_TOKEN_BUDGET} chunked, "
                                   f"{DEFAULT_PREFILL_TOKEN_BUDGET} prefill batches)")
MaxNumSeqsOpt = typer.Option(None, "--max-num-seqs", min=1,
                             help=f"Sequences per batch (default {DEFAULT_MAX_BATCH_SIZE})")


def batching_config(max_num_batched_tokens: int | None, max_num_seqs: int | None) -> BatchingConfig:
    """vLLM's knobs as the simulator's batching limits (unset ones keep the defaults)."""
    base = BatchingConfig()
    tokens = max_num_batched_tokens
    return BatchingConfig(prefill_token_budget=tokens or base.prefill_token_budget,
                          max_batch_size=max_num_seqs or base.max_batch_size,
                          chunk_token_budget=tokens or base.chunk_token_budget)


def chunked_prefill(enable: bool | None, prefill_first: bool) -> bool | None:
    """--enable-chunked-prefill / --no-enable-chunked-prefill, with --prefill-first as an alias of the latter."""
    if prefill_first:
        if enable:
            raise SpecError("--prefill-first contradicts --enable-chunked-prefill", field="--prefill-first")
        return False
    return enable


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise SpecError("must be positive", field=name)


def simulate_cmd(
    cluster: str = ClusterOpt,
    model: str = ModelOpt,
    workload: str = WorkloadOpt,
    plan: Path = typer.Option(..., "--plan", help="Plan JSON (from `thunderserve plan`)"),
    rate: float | None = typer.Option(None, "--rate", help="Arrival rate, req/s (default: the max rate at the SLO)"),
    trace: Path | None = typer.Option(None, "--trace",
                                      help="Replay this trace CSV's own arrival times (replaces --workload)"),
    duration: float = DurationOpt,
    warmup: float = WarmupOpt,
    seed: int = SeedOpt,
    no_search: bool = typer.Option(False, "--no-search", help="Skip the max-rate bisection (needs --rate or --trace)"),
    enable_chunked_prefill: bool | None = ChunkedPrefillOpt,
    prefill_first: bool = PrefillFirstOpt,
    max_num_batched_tokens: int | None = MaxBatchedTokensOpt,
    max_num_seqs: int | None = MaxNumSeqsOpt,
    slo: float | None = SloScaleOpt,
    ttft_ms: float | None = TtftOpt,
    tpot_ms: float | None = TpotOpt,
    attainment: float = AttainOpt,
    event: list[str] | None = typer.Option(
        None, "--event", help="Timed event T:fail:NODE[:I] | T:workload:NAME|CSV | T:add:NODE.yaml (repeatable); "
        "simulates the rescheduling policies side by side (needs --rate)"),
    timeline: Path | None = typer.Option(None, "--timeline", help="With --event: write the attainment-over-time "
                                         "plot to this PNG"),
    policies: str = typer.Option("none,lightweight,full", "--policies",
                                 help="With --event: rescheduling policies to compare"),
    bucket: float = typer.Option(30.0, "--bucket", help="With --event: attainment bucket width (s of arrivals)"),
    decision_time: str = typer.Option("measured", "--decision-time",
                                      help="With --event: 'measured' (wall-clock of each re-plan) or a fixed "
                                      "number of seconds for the lightweight decision (the full search then "
                                      "takes --time-limit)"),
    time_limit: float = typer.Option(10.0, "--time-limit",
                                     help="With --event: time limit of the full re-plan search (and of the fresh "
                                     "reference plan), s"),
    heartbeat_timeout: float = typer.Option(3.0, "--heartbeat-timeout",
                                            help="With --event: a GPU silent this long is declared dead (s)"),
    no_reference: bool = typer.Option(False, "--no-reference",
                                      help="With --event: skip the fresh full plan for the final state"),
    as_json: bool = JsonOpt,
) -> None:
    """Simulate a plan: max rate at the SLO (bisection) and the metrics at --rate (or at that maximum).

    With --event: replay timed failures / workload shifts / additions at --rate and compare rescheduling
    policies (none, lightweight, full) on the same request stream: attainment over time, detection, decision
    and apply times, and the event log.
    """
    from thunderserve.report.compare import finite_json, system_entry
    from thunderserve.sim.metrics import max_rate_at_slo, poisson_stream, trace_stream
    from thunderserve.sim.replay import simulate

    _positive("--rate", rate)
    _positive("--duration", duration)
    if warmup < 0:
        raise SpecError("must be >= 0", field="--warmup")
    prefill_first = chunked_prefill(enable_chunked_prefill, prefill_first) is False
    batching = batching_config(max_num_batched_tokens, max_num_seqs)
    if event:
        _simulate_timeline(cluster, model, workload, plan, rate, trace, duration, warmup, seed, prefill_first, slo,
                           ttft_ms, tpot_ms, attainment, event, timeline, policies, bucket, decision_time,
                           time_limit, heartbeat_timeout, not no_reference, as_json)
        return
    if timeline is not None:
        raise SpecError("--timeline needs at least one --event", field="--timeline")
    if rate is not None and trace is not None:
        raise SpecError("give either --rate or --trace, not both", field="--rate")
    if no_search and rate is None and trace is None:
        raise SpecError("--no-search needs --rate or --trace (the rate to simulate)", field="--no-search")
    # With --trace the trace is the workload: its lengths also set the SLO's reference latency.
    inputs = load_inputs(cluster, model, str(trace) if trace is not None else workload, slo, ttft_ms, tpot_ms,
                         attainment)
    the_plan = load_plan(plan)
    policy = ColocatedPolicy.PREFILL_FIRST if prefill_first else ColocatedPolicy.CHUNKED
    sim_cfg = SimConfig(batching=batching, colocated_policy=policy, warmup_s=warmup)
    load = LoadConfig(duration_s=duration, seed=seed)
    wl = inputs.workload
    stream = None
    if trace is not None:
        stream = trace_stream(wl, duration)
    fn = stream or poisson_stream(wl, load, warmup)
    max_rate = None
    with _progress() as bar:
        if not no_search:
            task = bar.add_task("max rate at the SLO", total=None)

            def probe(r: float, ok: bool) -> None:
                bar.update(task, description=f"max rate at the SLO: {r:.2f} req/s {'meets' if ok else 'misses'}")

            max_rate = max_rate_at_slo(the_plan, inputs.cluster, inputs.model, wl, inputs.slo, sim_cfg, load,
                                       stream=stream, progress=probe).rate_rps
            bar.remove_task(task)
        if trace is not None:
            at_rate = wl.trace_rate_rps
            requests = wl.trace_requests(duration_s=duration)
        else:
            at_rate = rate if rate is not None else (max_rate or 0.0)
            if at_rate <= 0:
                raise SpecError("the plan meets the SLO at no rate; give --rate to simulate anyway", field="--rate")
            requests = fn(at_rate)
        bar.add_task(f"simulating {requests[0].size} requests at {at_rate:.2f} req/s", total=None)
        result = simulate(the_plan, inputs.cluster, inputs.model, *requests, sim_cfg)
    entry: dict[str, Any] = system_entry(the_plan, inputs.cluster, inputs.slo, result, at_rate, max_rate)
    import numpy as np

    done = result.measured & np.isfinite(result.finish_s)
    entry.update({"rate_rps": at_rate, "workload": wl.name, "colocated_policy": str(policy),
                  "mean_ttft_s": float(np.mean(result.ttft_s[done])) if done.any() else None,
                  "mean_tpot_s": float(np.mean(result.tpot_s[done & (result.output_tokens > 1)]))
                  if (done & (result.output_tokens > 1)).any() else None,
                  "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": sim_cfg.batching.max_batch_size,
                  "chunk_token_budget": sim_cfg.batching.chunk_token_budget,
                  "prefill_token_budget": sim_cfg.batching.prefill_token_budget,
                  "sim_wall_s": result.wall_s, "sim_events": result.events})
    entry = finite_json(entry)
    if as_json:
        print_json(entry)
        return
    from rich.table import Table

    table = Table(title=f"{the_plan.model} on {inputs.cluster.name}: {wl.name} at {at_rate:.2f} req/s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("max_rate_at_slo", "slo_attainment", "throughput_rps", "throughput_tokens_s",
                "latency_deadline_scale", "p50_ttft_s", "p90_ttft_s", "p99_ttft_s", "p50_tpot_s", "p90_tpot_s",
                "p99_tpot_s", "p99_e2e_s", "num_requests", "oversized_requests", "preemptions"):
        v = entry.get(key)
        table.add_row(key, "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
    out.print(table)


def _simulate_timeline(cluster: str, model: str, workload: str, plan: Path, rate: float | None, trace: Path | None,
                       duration: float, warmup: float, seed: int, prefill_first: bool, slo: float | None,
                       ttft_ms: float | None, tpot_ms: float | None, attainment: float, events: list[str],
                       timeline: Path | None, policies: str, bucket: float, decision_time: str, time_limit: float,
                       heartbeat_timeout: float, reference: bool, as_json: bool) -> None:
    """`simulate --event ...`: the rescheduling policies side by side (see `sim.timeline`)."""
    import dataclasses

    from thunderserve.report.compare import finite_json
    from thunderserve.report.timeline import (
        checks_table,
        log_table,
        plot_timeline,
        timeline_checks,
        timeline_table,
    )
    from thunderserve.resched.events import parse_event
    from thunderserve.scheduler import SchedulerConfig
    from thunderserve.sim.timeline import ReschedPolicy, TimelineConfig, run_timeline

    if trace is not None:
        raise SpecError("--event replays Poisson arrivals at --rate; it does not take --trace", field="--trace")
    if rate is None:
        raise SpecError("--event needs --rate (the arrival rate for the whole run)", field="--rate")
    _positive("--bucket", bucket)
    _positive("--time-limit", time_limit)
    _positive("--heartbeat-timeout", heartbeat_timeout)
    names = [x.strip() for x in policies.split(",") if x.strip()]
    valid = {str(p) for p in ReschedPolicy}
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SpecError(f"unknown policy '{bad[0] if bad else ''}' (choose from {', '.join(sorted(valid))})",
                        field="--policies")
    light_s: float | None = None
    full_s: float | None = None
    if decision_time != "measured":
        try:
            light_s = float(decision_time)
        except ValueError:
            raise SpecError(f"expected 'measured' or seconds, got '{decision_time}'", field="--decision-time") from None
        if light_s < 0:
            raise SpecError("must be >= 0", field="--decision-time")
        full_s = time_limit
    parsed = [parse_event(e, timed=True) for e in events]
    inputs = load_inputs(cluster, model, workload, slo, ttft_ms, tpot_ms, attainment)
    the_plan = load_plan(plan)
    policy = ColocatedPolicy.PREFILL_FIRST if prefill_first else ColocatedPolicy.CHUNKED
    sim_cfg = SimConfig(colocated_policy=policy, warmup_s=warmup)
    sched = SchedulerConfig(time_limit_s=time_limit, seed=seed, kv_compression=the_plan.kv_transfer.compression)
    cfg = dataclasses.replace(TimelineConfig(), heartbeat_timeout_s=heartbeat_timeout, light_decision_s=light_s,
                              full_decision_s=full_s, scheduler=sched)
    with _progress() as bar:
        task = bar.add_task("timeline", total=None)
        result = run_timeline(the_plan, inputs.cluster, inputs.model, inputs.slo, inputs.workload, parsed, rate,
                              duration, seed=seed, policies=[ReschedPolicy(n) for n in names], config=cfg,
                              sim_config=sim_cfg, bucket_s=bucket, reference=reference,
                              progress=lambda what: bar.update(task, description=what))
    doc = result.to_dict()
    doc.update({"model": inputs.model.name, "cluster": inputs.cluster.name,
                "decision_time": decision_time, "plan_groups": len(the_plan.groups)})
    checks = timeline_checks(doc)
    doc["checks"] = checks
    doc = finite_json(doc)
    if timeline is not None:
        plot_timeline(doc, timeline, checks)
    if as_json:
        print_json(doc)
        return
    out.print(timeline_table(doc))
    out.print(log_table(doc, tuple(n for n in names if n != "none")))
    if checks:
        out.print(checks_table(checks))


def compare_cmd(
    cluster: str = ClusterOpt,
    model: str = ModelOpt,
    workload: str = WorkloadOpt,
    baseline_cluster: str | None = typer.Option(None, "--baseline-cluster",
                                                help="Also plan every system on this cluster (e.g. inhouse-8xa100)"),
    systems: str | None = typer.Option(None, "--systems", "--baselines",
                                       help="Comma-separated systems (default: thunderserve, "
                                            "thunderserve-uncompressed, thunderserve-colocated, vllm, distserve, "
                                            "hexgen; also thunderserve-int8, thunderserve-int4)"),
    no_kv_levels: bool = typer.Option(False, "--no-kv-levels",
                                      help="Do not add ThunderServe once per KV compression level the gate allows"),
    plot: Path | None = typer.Option(None, "--plot", help="Write the attainment plots to this PNG"),
    report: Path | None = typer.Option(None, "--report", help="Write a Markdown report to this file"),
    duration: float = DurationOpt,
    min_requests: int = typer.Option(DEFAULT_MIN_REQUESTS, "--min-requests",
                                     help="At least this many requests per simulated run (the duration stretches)"),
    warmup: float = WarmupOpt,
    seed: int = SeedOpt,
    budget: int = BudgetOpt,
    time_limit: float | None = TimeCapOpt,
    no_curves: bool = typer.Option(False, "--no-curves", help="Skip the attainment-vs-rate curve runs"),
    verify_top: int = typer.Option(0, "--verify-top", help="Every system that searches re-scores its K best "
                                   "candidates by simulation (0: off)"),
    kv_compression: str = KvCompressionOpt,
    kv_gate: Path | None = KvGateOpt,
    chunked_only: bool = typer.Option(False, "--chunked-only",
                                      help="Do not also try the prefill-first policy for colocated-only systems"),
    enable_chunked_prefill: bool | None = typer.Option(
        None, "--enable-chunked-prefill/--no-enable-chunked-prefill",
        help="Run colocated groups with (or without) chunked prefill only; unset: chunked, and colocated-only "
        "systems also try prefill-first unless --chunked-only"),
    prefill_first: bool = PrefillFirstOpt,
    max_num_batched_tokens: int | None = MaxBatchedTokensOpt,
    max_num_seqs: int | None = MaxNumSeqsOpt,
    slo: float | None = SloScaleOpt,
    ttft_ms: float | None = TtftOpt,
    tpot_ms: float | None = TpotOpt,
    attainment: float = AttainOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Plan ThunderServe and every peer on the same GPUs, simulate each, and compare (what each system is
    given: `report.systems.SYSTEMS`, and `config` per system in --json)."""
    from thunderserve.report import (
        CompareConfig,
        comparison_table,
        plot_comparison,
        run_comparison,
        write_markdown,
    )

    _positive("--duration", duration)
    _positive("--time-limit", time_limit)
    _positive("--budget", budget)
    if warmup < 0:
        raise SpecError("must be >= 0", field="--warmup")
    if verify_top < 0:
        raise SpecError("must be >= 0", field="--verify-top")
    inputs = load_inputs(cluster, model, workload, slo, ttft_ms, tpot_ms, attainment)
    verdict, forced = resolve_kv_compression(kv_compression, inputs.model.name, kv_gate)
    other = load_cluster(baseline_cluster) if baseline_cluster else None
    names = tuple(x.strip() for x in systems.split(",") if x.strip()) if systems else CompareConfig().systems
    if systems and "thunderserve" not in names:
        names = ("thunderserve", *names)  # the comparison is against ours
    _positive("--min-requests", min_requests)
    chunked = chunked_prefill(enable_chunked_prefill, prefill_first)
    policy = ColocatedPolicy.PREFILL_FIRST if chunked is False else ColocatedPolicy.CHUNKED
    sim_cfg = SimConfig(batching=batching_config(max_num_batched_tokens, max_num_seqs), colocated_policy=policy,
                        warmup_s=warmup)
    config = CompareConfig(load=LoadConfig(duration_s=duration, seed=seed, min_requests=min_requests),
                           sim=sim_cfg, systems=names, per_kv_level=not no_kv_levels, budget=budget,
                           planner_time_limit_s=time_limit, curves=not no_curves or plot is not None,
                           try_prefill_first=not chunked_only and chunked is None, seed=seed, verify_top=verify_top,
                           kv_compression=Compression(verdict.level) if forced else None)
    gate = {**verdict.as_dict(), "forced": forced}
    console.print(f"ThunderServe's KV compression: {verdict.level} ({'forced' if forced else 'auto'}; "
                  f"{'passes' if verdict.passes else 'did NOT pass'} the KV quality gate: {verdict.source})",
                  soft_wrap=True, highlight=False)
    with _progress() as bar:
        task = bar.add_task("comparing", total=None)

        def tick(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        doc = run_comparison(inputs.cluster, inputs.model, inputs.workload, inputs.slo, baseline_cluster=other,
                             config=config, progress=tick)
    doc["kv_gate"] = gate
    if plot is not None:
        plot_comparison(doc, plot)
    if report is not None:
        write_markdown(doc, report, plot)
    if as_json:
        print_json(doc)
    else:
        out.print(comparison_table(doc))


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_cmd)
    app.command("compare")(compare_cmd)
