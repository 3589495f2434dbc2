"""Serving a plan: launch workers, start the router inside the HTTP server's loop, stop everything cleanly.

Rollout of a plan (the order `serve` follows):
    1. check the plan is servable and build one launch spec per group
    2. start workers (local processes or Ray actors); each loads the model once and reports its ports
    3. start uvicorn; its lifespan connects the router to every worker and configures roles/routing
    4. serve, with the re-scheduling controller running in the same loop (unless `resched` is off): a
       worker that dies has its requests retried elsewhere by the router; a supervisor (`restart_workers`;
       local processes or Ray actors) reaps it, restarts it with back-off and re-admits it to the same group and role
       (`launch.supervisor`); without one, or once it gives up, the controller re-plans without its GPUs and
       reconciles (see `resched.controller`); /admin/replan asks for the same by hand
    5. SIGINT/SIGTERM make uvicorn leave the lifespan: the controller stops, the router fails in-flight
       requests ("shutting down"), tells workers to shut down, and the launcher reaps them (SIGTERM, then
       SIGKILL)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI

from thunderserve.costmodel.reference import slo_from_scale
from thunderserve.errors import ThunderServeError
from thunderserve.plan.model import Plan
from thunderserve.resched.actuator import RouterActuator
from thunderserve.resched.controller import ReplanContext, ReschedController
from thunderserve.runtime.api.admin import AdminState
from thunderserve.runtime.api.admin_files import AdminFiles
from thunderserve.runtime.api.app import ApiConfig, create_app
from thunderserve.runtime.api.limits import DEFAULT_MAX_BODY_BYTES, RequestLimits
from thunderserve.runtime.frontend import Frontend
from thunderserve.runtime.kv.transport import new_secret
from thunderserve.runtime.launch.base import (
    Launcher,
    LaunchError,
    WorkerEndpoint,
    cuda_devices,
    cuda_rank_devices,
    group_tp,
    worker_specs,
)
from thunderserve.runtime.launch.demo import LOCAL_DEVICE
from thunderserve.runtime.launch.local import LocalLauncher
from thunderserve.runtime.launch.supervisor import Supervisor, reap_loop, supervisor_for
from thunderserve.runtime.router import Router, RouterConfig
from thunderserve.runtime.workers.protocol import DEFAULT_KV_CAPACITY_TOKENS, WorkerConfig
from thunderserve.spec.cluster import Cluster, ClusterSpec, builtin_clusters, load_cluster, resolve_cluster
from thunderserve.spec.served import model_spec_for
from thunderserve.spec.slo import DEFAULT_SLO_SCALE
from thunderserve.spec.workload import load_workload

if TYPE_CHECKING:
    from thunderserve.runtime.vllm.instances import VllmConfig

log = logging.getLogger("thunderserve.serve")


@dataclass(frozen=True)
class ServeConfig:
    model: str  # engine model reference: HuggingFace directory, "smollm2", or "fake"
    backend: str = "local"  # "local" (processes) or "ray" (actors)
    ray_address: str | None = None
    host: str = "127.0.0.1"  # HTTP bind address
    port: int = 8000
    cpu_threads: int = 1  # torch threads per worker
    api_key: str | None = None
    worker_host: str = "127.0.0.1"  # bind address of worker servers (0.0.0.0 for multi-node Ray)
    kv_capacity_tokens: int = DEFAULT_KV_CAPACITY_TOKENS
    heartbeat_timeout_s: float = 15.0
    log_level: str = "warning"
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", or "cuda"
    max_retries: int = 3  # re-submissions of a request whose worker died (0: fail it)
    resched: bool = True  # run the re-scheduling controller (failures, workload shifts, /admin/replan)
    cluster: str | None = None  # cluster the plan runs on, for re-planning (default: the plan's own if
    #                             built in, else one LOCAL-CPU device per plan GPU id)
    resched_workload: str = "conversation"  # planned for until enough requests were observed
    collapse_tp: bool = False  # each stage on its first GPU in one process (no tensor-parallel ranks)
    vllm: VllmConfig | None = None  # engine: None = built-in workers; else one vLLM instance per group
    admin_files_dir: str | None = None  # folder /admin/replan may read files in (None: presets only)
    max_queued_requests: int = 256  # requests waiting for their first token; beyond, new ones get 429
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    restart_workers: bool = True  # restart dead workers with back-off (both engines and backends; launch.supervisor)


def served_names(plan: Plan, model: str) -> tuple[str, tuple[str, ...]]:
    """The model id clients use (the plan's model) and accepted aliases (the --model value, its basename)."""
    aliases = {model, Path(model).name} - {plan.model, ""}
    return plan.model, tuple(sorted(aliases))


class Deployment:
    """A plan's workers plus the router that fronts them."""

    def __init__(self, plan: Plan, config: ServeConfig, launcher: Launcher | None = None) -> None:
        self.plan = plan
        self.config = config
        if launcher is None:
            if config.backend == "ray":
                from thunderserve.runtime.launch.ray import RayLauncher

                launcher = RayLauncher(plan, config.ray_address, use_gpus=config.device == "cuda")
            elif config.backend == "local":
                launcher = LocalLauncher()
            else:
                raise ValueError(f"unknown backend '{config.backend}' (local, ray)")
        self.launcher = launcher
        self.endpoints: dict[str, WorkerEndpoint] = {}
        self.router: Router | None = None

    def start_workers(self) -> dict[str, WorkerEndpoint]:
        secret = new_secret()  # per deployment: the router and KV peers prove it to every worker
        knobs = WorkerConfig(group_id="-", role=self.plan.groups[0].phase,
                             kv_capacity_tokens=self.config.kv_capacity_tokens,
                             kv_frame_max_bytes=kv_frame_cap_bytes(self.config.model))
        specs = worker_specs(self.plan, self.config.model, cpu_threads=self.config.cpu_threads,
                             host=self.config.worker_host, knobs=knobs, devices=self._devices(),
                             collapse_tp=self.config.collapse_tp,
                             rank_devices=self._rank_devices(), secret=secret)
        self.endpoints = self.launcher.start(specs)
        self.router = Router(self.plan, {g: (e.host, e.control_port) for g, e in self.endpoints.items()},
                             RouterConfig(heartbeat_timeout_s=self.config.heartbeat_timeout_s,
                                          max_retries=self.config.max_retries,
                                          max_queued_requests=self.config.max_queued_requests),
                             secret=secret)
        return self.endpoints

    def worker_pids(self) -> dict[str, int]:
        return self.launcher.worker_pids()

    def _devices(self) -> dict[str, tuple[str, ...]]:
        """Per-group, per-stage torch devices of the worker (TP rank 0): local CUDA devices by plan GPU index;
        under Ray, the GPUs Ray gave the actor (see `_rank_devices`); CPU without GPUs or for the fake engine."""
        if self.config.device == "cpu" or self.config.model.startswith("fake"):
            return {}
        if self.config.backend == "ray":
            if self.config.device != "cuda":
                return {}
            return {gid: ranks[0] for gid, ranks in self._ray_rank_devices().items()}
        import torch

        count = torch.cuda.device_count()
        if self.config.device == "cuda" and count == 0:
            raise LaunchError("--device cuda: no CUDA device on this machine")
        return cuda_devices(self.plan, count)

    def _rank_devices(self) -> dict[str, tuple[tuple[str, ...], ...]]:
        """CUDA devices of each group's TP ranks ([rank][stage]): local ones by plan GPU index, under Ray the
        actor's; CPU otherwise."""
        if self.config.device == "cpu" or self.config.model.startswith("fake"):
            return {}
        if self.config.backend == "ray":
            if self.config.device != "cuda":
                return {}
            return {gid: ranks for gid, ranks in self._ray_rank_devices().items() if len(ranks) > 1}
        import torch

        return cuda_rank_devices(self.plan, torch.cuda.device_count())

    def _ray_rank_devices(self) -> dict[str, tuple[tuple[str, ...], ...]]:
        """Under Ray an actor sees the GPUs it was given as cuda:0..n-1 (n = stages x TP ranks): rank r of
        stage s takes cuda:{s*tp + r} (tp = 1 when collapsed)."""
        out = {}
        for g in self.plan.groups:
            tp = 1 if self.config.collapse_tp else group_tp(g)
            out[g.id] = tuple(tuple(f"cuda:{s * tp + r}" for s in range(g.pp)) for r in range(tp))
        return out

    def stop(self) -> None:
        self.launcher.stop()


def make_supervisor(dep: Deployment, router: Router) -> Supervisor | None:
    """The supervisor of the deployment's workers when `restart_workers` is on and the launcher can restart
    them (local processes, Ray actors); None otherwise (dead workers are only reaped)."""
    return supervisor_for(dep.launcher, router, sorted(dep.endpoints), dep.config.restart_workers)


def kv_frame_cap_bytes(model: str) -> int:
    """The largest KV payload a worker may need to accept: a full context of the model's keys and values at
    4 bytes per element (no codec sends more), plus 1 MiB of slack; 1 GiB when the model is unknown."""
    try:
        spec = model_spec_for(model)
    except (ThunderServeError, ValueError):
        return 1024**3
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * spec.max_context_tokens * 4 + 1024**2


def build_app(dep: Deployment) -> FastAPI:
    """The HTTP app of a deployment whose workers are started; its lifespan runs the router."""
    if dep.router is None:
        raise RuntimeError("start the workers before building the app")
    router = dep.router
    controller = make_controller(dep.plan, dep.config, router) if dep.config.resched else None
    supervisor = make_supervisor(dep, router)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.start()
        if controller is not None:
            controller.start()
        reaper = None
        if supervisor is not None:
            supervisor.start()
        else:
            reaper = asyncio.create_task(reap_loop(dep.launcher), name="worker-reaper")
        try:
            yield
        finally:
            if reaper is not None:
                reaper.cancel()
            if supervisor is not None:
                await supervisor.stop()
            if controller is not None:
                await controller.stop()
            await router.close(shutdown_workers=True)
            await asyncio.to_thread(dep.stop)

    name, aliases = served_names(dep.plan, dep.config.model)
    files = AdminFiles(Path(dep.config.admin_files_dir) if dep.config.admin_files_dir else None)
    limits = RequestLimits(max_body_bytes=dep.config.max_body_bytes)
    return create_app(router, ApiConfig(name, dep.config.api_key, aliases, limits),
                      admin=AdminState(router, dep, controller, files), lifespan=lifespan)


def resched_cluster(plan: Plan, ref: str | None = None) -> Cluster:
    """The cluster to re-plan on: `ref`, the plan's cluster when built in, else one node per plan node with
    one LOCAL-CPU device per GPU index used (this machine, as the demo describes it)."""
    if ref is not None:
        return load_cluster(ref)
    if plan.cluster in builtin_clusters():
        return load_cluster(plan.cluster)
    counts: dict[str, int] = {}
    for gpu in plan.gpus:
        node, _, index = gpu.rpartition(":")
        if not node or not index.isdigit():
            raise ValueError(f"GPU id '{gpu}' is not NODE:INDEX; give the cluster to re-plan on")
        counts[node] = max(counts.get(node, 0), int(index) + 1)
    spec = ClusterSpec.model_validate({"name": plan.cluster, "gpu_types": [LOCAL_DEVICE],
                                       "nodes": [{"name": n, "gpu": LOCAL_DEVICE["name"], "count": c}
                                                 for n, c in sorted(counts.items())]})
    return resolve_cluster(spec, plan.cluster)


def make_controller(plan: Plan, config: ServeConfig, router: Frontend) -> ReschedController | None:
    """The re-scheduling controller over `router`, observing its requests; None (logged) when the facts a
    re-plan needs (model architecture, cluster) cannot be had - serving goes on without it."""
    try:
        model = model_spec_for(config.model).model_copy(update={"name": plan.model})
        workload = load_workload(config.resched_workload)
        context = ReplanContext(cluster=resched_cluster(plan, config.cluster), model=model,
                                slo=slo_from_scale(model, workload, DEFAULT_SLO_SCALE), workload=workload)
    except (ThunderServeError, ValueError) as exc:
        log.warning("re-scheduling disabled: %s", exc)
        return None
    controller = ReschedController(RouterActuator(router), plan, context, clock=router.clock)
    router.add_observer(controller.observe)
    return controller


def serve(plan: Plan, config: ServeConfig, launcher: Launcher | None = None) -> None:
    """Run the deployment until SIGINT/SIGTERM (blocking); workers never outlive this call."""
    import uvicorn

    if config.vllm is not None:
        from thunderserve.runtime.vllm.deploy import serve_vllm

        serve_vllm(plan, config, config.vllm)
        return

    dep = Deployment(plan, config, launcher)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if main:  # while workers load, SIGTERM unwinds like Ctrl-C so the `finally` below reaps them
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        dep.start_workers()
        app = build_app(dep)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                               log_level=config.log_level, lifespan="on"))
        if main:
            # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal against the handlers
            # it found: make those a no-op so the process ends normally (exit 0) after the clean shutdown.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
        server.run()
    finally:
        dep.stop()
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)

