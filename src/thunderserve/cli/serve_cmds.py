"""`thunderserve serve` and `bench-serve`: run a plan behind the OpenAI API, load-test it."""

from __future__ import annotations

import asyncio
import math
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from thunderserve.cli.common import JsonOpt, console, out, print_json
from thunderserve.errors import PlanError, SpecError, ThunderServeError
from thunderserve.plan import Plan, load_plan, validate_plan
from thunderserve.spec import ModelSpec, SloSpec, load_cluster, load_workload
from thunderserve.spec.served import FAKE_MODEL, model_spec_for

if TYPE_CHECKING:
    from thunderserve.runtime.vllm.instances import VllmConfig

__all__ = ["FAKE_MODEL", "model_spec_for", "register"]  # FAKE_MODEL, model_spec_for: re-exported (moved to spec)

def _needs_runtime(command: str, exc: ImportError) -> ThunderServeError:
    return ThunderServeError(f"{command} needs the runtime ('{exc.name or exc}' is not installed): "
                             "pip install 'thunderserve[serve]'")


def _check_port_free(host: str, port: int) -> None:
    """SpecError naming --port when HOST:PORT cannot be bound (taken, or not an address of this machine)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise SpecError(f"cannot resolve '{host}': {exc.strerror or exc}", field="--host") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(addr)
        except OSError as exc:
            raise SpecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", field="--port") from None


def _check_layers(plan: Plan, spec: ModelSpec) -> None:
    for g in plan.groups:
        end = g.stages[-1].layers[1]
        if end != spec.num_layers:
            raise PlanError(f"groups.{g.id}: stages cover layers [0, {end}), model {spec.name} has "
                            f"{spec.num_layers}")


def serve(
    plan_path: Path | None = typer.Option(None, "--plan", help="Plan JSON to serve"),
    model: str = typer.Option("smollm2", "--model", help="HuggingFace model directory, or smollm2"),
    demo: bool = typer.Option(False, "--demo", help="Serve a 1 prefill + 1 decode demo plan on this machine"),
    backend: str = typer.Option("local", "--backend", help="local (processes) or ray (actors)"),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (ray backend)"),
    host: str = typer.Option("127.0.0.1", "--host", help="HTTP bind address"),
    port: int = typer.Option(8000, "--port", help="HTTP port"),
    cpu_threads: int = typer.Option(1, "--cpu-threads", help="Torch threads per worker"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="THUNDERSERVE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on /v1 and /admin"),
    cluster: str | None = typer.Option(None, "--cluster",
                                       help="Cluster the plan runs on: validates the plan and is what re-planning "
                                            "plans over (default: the plan's built-in cluster, else one CPU "
                                            "device per plan GPU)"),
    worker_host: str = typer.Option("127.0.0.1", "--worker-host",
                                    help="Bind address of worker servers (0.0.0.0 for multi-node Ray)"),
    kv_capacity_tokens: int = typer.Option(65536, "--kv-capacity-tokens", help="KV tokens per worker"),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, or cuda"),
    collapse_tp: bool = typer.Option(False, "--collapse-tp",
                                     help="Run each plan stage on its first GPU in one process (no tensor "
                                          "parallel ranks; for small machines)"),
    max_retries: int = typer.Option(3, "--max-retries",
                                    help="Re-submissions of a request whose worker died (0: fail it at once)"),
    no_resched: bool = typer.Option(False, "--no-resched",
                                    help="Do not run the re-scheduling controller (no automatic re-plan on "
                                         "failures or workload shifts; /admin/replan still works by hand)"),
    resched_workload: str = typer.Option("conversation", "--resched-workload",
                                         help="Workload preset or trace CSV re-planning assumes until enough "
                                              "requests were observed"),
    engine: str = typer.Option("auto", "--engine", envvar="THUNDERSERVE_ENGINE",
                               help="vllm (one vLLM instance per group), builtin (our PyTorch workers), or auto "
                                    "(vllm when its environment is found, builtin otherwise)"),
    vllm_python: str | None = typer.Option(None, "--vllm-python",
                                           help="Python of vLLM's environment (default: .venv-vllm/bin/python)"),
    vllm_dtype: str = typer.Option("float32", "--vllm-dtype", help="vLLM --dtype (float32, bfloat16, auto...)"),
    vllm_compile: bool = typer.Option(False, "--vllm-compile",
                                      help="Let vLLM compile (torch.compile / CUDA graphs): slower start, faster "
                                           "steps (default: --enforce-eager)"),
    vllm_kv_cache_gib: int = typer.Option(2, "--vllm-kv-cache-gib", help="KV cache per CPU instance, GiB"),
    vllm_max_model_len: int | None = typer.Option(None, "--vllm-max-model-len", help="vLLM --max-model-len"),
    vllm_arg: list[str] = typer.Option([], "--vllm-arg", help="Extra vLLM server argument (repeatable)"),
    admin_files_dir: Path | None = typer.Option(None, "--admin-files-dir",
                                                help="Folder whose files /admin/replan events may name (trace "
                                                     "CSVs, node YAMLs); default: none, presets only"),
    max_queued_requests: int = typer.Option(256, "--max-queued-requests",
                                            help="Requests waiting for their first token; more get 429 with "
                                                 "Retry-After"),
    max_body_bytes: int = typer.Option(8 * 1024 * 1024, "--max-body-bytes",
                                       help="Largest request body accepted (larger: 413)"),
    restart_workers: bool = typer.Option(True, "--restart-workers/--no-restart-workers",
                                         help="Restart a dead worker with back-off (1, 2, 4 ... 30 s; give up "
                                              "after 5 failures in a row) and route to it again (local "
                                              "or Ray backend; built-in engine and vLLM instances)"),
) -> None:
    """Serve a plan (or the demo) with an OpenAI-compatible API until SIGINT/SIGTERM."""
    try:
        from thunderserve.runtime.launch import LaunchError
        from thunderserve.runtime.launch.base import check_servable
        from thunderserve.runtime.launch.demo import demo_plan
        from thunderserve.runtime.launch.serve import ServeConfig
        from thunderserve.runtime.launch.serve import serve as run_serve
    except ImportError as exc:
        raise _needs_runtime("serve", exc) from None

    if backend not in ("local", "ray"):
        raise SpecError(f"unknown backend '{backend}' (local, ray)", field="--backend")
    if device not in ("auto", "cpu", "cuda"):
        raise SpecError(f"unknown device '{device}' (auto, cpu, cuda)", field="--device")
    if backend == "local" and ray_address:
        raise SpecError("--ray-address needs --backend ray", field="--ray-address")
    if max_retries < 0:
        raise SpecError("must be >= 0", field="--max-retries")
    load_workload(resched_workload)  # a bad preset or CSV fails here, before any worker starts
    if admin_files_dir is not None and not admin_files_dir.is_dir():
        raise SpecError("not a folder", field="--admin-files-dir")
    if not 1024 <= max_body_bytes <= 12 * 1024 * 1024:
        raise SpecError("must be in [1024, 12582912] (a request must fit one worker frame)", field="--max-body-bytes")
    for name, value in (("--cpu-threads", cpu_threads), ("--kv-capacity-tokens", kv_capacity_tokens),
                        ("--max-queued-requests", max_queued_requests)):
        if value < 1:
            raise SpecError("must be at least 1", field=name)
    if not 0 <= port < 65536:
        raise SpecError("must be in [0, 65535]", field="--port")
    spec = model_spec_for(model)
    if demo:
        if plan_path is not None:
            raise SpecError("give either --plan or --demo, not both", field="--demo")
        plan = demo_plan(spec)
    elif plan_path is None:
        raise SpecError("missing (or use --demo)", field="--plan")
    else:
        plan = load_plan(plan_path)
        if cluster is not None:
            validate_plan(plan, load_cluster(cluster), spec.model_copy(update={"name": plan.model}))
        check_servable(plan)
        _check_layers(plan, spec)
    vllm = _vllm_config(engine, model, backend, vllm_python, vllm_dtype, vllm_compile, vllm_kv_cache_gib,
                        vllm_max_model_len, vllm_arg, worker_host, cpu_threads, device)
    config = ServeConfig(model=model, backend=backend, ray_address=ray_address, host=host, port=port,
                         cpu_threads=cpu_threads, api_key=api_key, worker_host=worker_host,
                         kv_capacity_tokens=kv_capacity_tokens, log_level=log_level, device=device,
                         collapse_tp=collapse_tp, max_retries=max_retries, resched=not no_resched,
                         cluster=cluster, resched_workload=resched_workload, vllm=vllm,
                         admin_files_dir=str(admin_files_dir) if admin_files_dir is not None else None,
                         max_queued_requests=max_queued_requests, max_body_bytes=max_body_bytes,
                         restart_workers=restart_workers)
    _check_port_free(host, port)  # before any worker starts: a taken port is one line, exit 2
    groups = ", ".join(f"{g.id}={g.phase}" for g in plan.groups)
    console.print(f"serving {plan.model} ({model}) on http://{host}:{port}  [{backend}, "
                  f"{'vllm' if vllm is not None else 'builtin'} engine: {groups}]")
    try:
        run_serve(plan, config)
    except LaunchError as exc:
        raise ThunderServeError(str(exc)) from None


def _vllm_config(engine: str, model: str, backend: str, python: str | None, dtype: str, compile_: bool,
                 kv_cache_gib: int, max_model_len: int | None, extra: list[str], host: str,
                 cpu_threads: int, device: str) -> VllmConfig | None:
    """The vLLM instances' knobs, or None for the built-in engine (`--engine auto` picks vllm when found)."""
    from thunderserve.runtime.vllm.instances import VllmConfig, find_vllm_python

    if engine not in ("auto", "builtin", "vllm"):
        raise SpecError(f"unknown engine '{engine}' (auto, builtin, vllm)", field="--engine")
    found = find_vllm_python(python)
    if engine == "builtin" or (engine == "auto" and (found is None or model.startswith("fake"))):
        return None
    if found is None:
        where = python or ".venv-vllm/bin/python"
        raise SpecError(f"vLLM's Python not found at {where} (run `make vllm`, or give --vllm-python)",
                        field="--vllm-python")
    if model.startswith("fake"):
        raise SpecError("the fake model has no weights vLLM can load; use --engine builtin", field="--model")
    if kv_cache_gib < 1:
        raise SpecError("must be at least 1", field="--vllm-kv-cache-gib")
    import os

    # UCX transports for NIXL: the user's UCX_TLS if set; else TCP/shared memory on CPU, UCX's own pick on GPUs
    ucx_tls = os.environ.get("UCX_TLS") or (None if device == "cuda" else "tcp,self,sm")
    return VllmConfig(python=found, host=host, dtype=dtype, kv_buffer_device="cpu" if device != "cuda" else "cuda",
                      ucx_tls=ucx_tls, enforce_eager=not compile_, cpu_kv_cache_gib=kv_cache_gib,
                      cpu_threads=cpu_threads, max_model_len=max_model_len, extra_args=tuple(extra),
                      spin_s=None if device == "cuda" else 0.0)


def bench_serve(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="Server base URL"),
    workload: str = typer.Option("conversation", "--workload", help="Workload preset or trace CSV"),
    rate: float = typer.Option(1.0, "--rate", help="Poisson arrival rate (requests/s)"),
    duration: float = typer.Option(30.0, "--duration", help="Seconds of arrivals"),
    seed: int = typer.Option(0, "--seed", help="Arrival and length sampling seed"),
    model: str | None = typer.Option(None, "--model", help="Model id (default: the server's first)"),
    api_key: str | None = typer.Option(None, "--api-key", envvar="THUNDERSERVE_API_KEY"),
    max_prompt_tokens: int | None = typer.Option(None, "--max-prompt-tokens",
                                                 help="Scale prompts to this p99 (default: context / 4)"),
    max_output_tokens: int = typer.Option(32, "--max-output-tokens", help="Scale outputs to this p99"),
    ttft_ms: float | None = typer.Option(None, "--ttft-ms", help="TTFT target for SLO attainment"),
    tpot_ms: float | None = typer.Option(None, "--tpot-ms", help="TPOT target for SLO attainment"),
    as_json: bool = JsonOpt,
) -> None:
    """Replay a workload (Poisson arrivals, trace lengths scaled to the model) against a running server."""
    try:
        import httpx

        from thunderserve.runtime.api.loadgen import (
            RequestResult,
            plan_requests,
            run_load,
            served_context,
            summarize,
        )
    except ImportError as exc:
        raise _needs_runtime("bench-serve", exc) from None

    if rate <= 0 or duration <= 0:
        raise SpecError("must be positive", field="--rate" if rate <= 0 else "--duration")
    if (ttft_ms is None) != (tpot_ms is None):
        raise SpecError("give both --ttft-ms and --tpot-ms for SLO attainment", field="--ttft-ms")
    slo = SloSpec(ttft_ms=ttft_ms, tpot_ms=tpot_ms) if ttft_ms is not None and tpot_ms is not None else None
    w = load_workload(workload)
    try:
        served, ctx = asyncio.run(served_context(url, api_key))
    except httpx.HTTPError as exc:
        raise ThunderServeError(f"--url: cannot reach {url}: {exc}") from None
    prompt_cap = max_prompt_tokens or max(ctx // 4, 1)
    if prompt_cap + max_output_tokens >= ctx:
        raise SpecError(f"prompt + output caps ({prompt_cap} + {max_output_tokens}) exceed the context of {ctx}",
                        field="--max-prompt-tokens")
    requests = plan_requests(w, rate, duration, seed, prompt_cap, max_output_tokens)
    with Progress(TextColumn("bench-serve"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("requests", total=len(requests))

        def done(_: RequestResult) -> None:
            progress.advance(task)

        results, wall_s = asyncio.run(run_load(url, requests, model=model or served, api_key=api_key, seed=seed,
                                               on_done=done))
    summary: dict[str, object] = dict(summarize(results, slo))
    summary.update({"rate_rps": rate, "duration_s": duration, "wall_s": wall_s, "workload": w.name,
                    "mean_prompt_tokens": float(sum(r.prompt_tokens for r in results if r.ok))
                    / max(sum(1 for r in results if r.ok), 1),
                    "errors": sorted({r.error for r in results if not r.ok})[:5]})
    if as_json:
        print_json({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()})
        return
    table = Table(title=f"bench-serve {w.name} @ {rate:g} req/s for {duration:g} s ({url})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("bench-serve")(bench_serve)
