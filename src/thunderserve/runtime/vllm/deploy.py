"""Serving a plan on vLLM: one instance per group, our router and OpenAI API in front, re-scheduling on top.

Rollout (the order `serve_vllm` follows):
    1. check the plan is servable; resolve the model to a HuggingFace directory vLLM can load
    2. pick free ports (HTTP + NIXL side channel per instance); start every instance (local processes);
       wait until each answers /health
    3. start uvicorn; its lifespan starts the `VllmRouter` (health and metrics polling) and the re-scheduling
       controller (flips and routing changes are routing-only; a dropped group's instance is stopped)
    4. serve: an instance that dies has its requests retried elsewhere by the router; with `restart_workers`
       (local processes or Ray actors) the built-in engine's supervisor reaps it, starts
       the same instance spec again with back-off and re-admits it to its group and role
       (`launch.supervisor`); without one, or once it gives up, the controller re-plans without its GPUs
    5. SIGINT/SIGTERM: the supervisor and the controller stop, in-flight requests fail ("shutting down"), instances are stopped
       (SIGTERM to each process group, SIGKILL after a grace period)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from thunderserve.plan.model import Plan
from thunderserve.runtime.api.admin import AdminState
from thunderserve.runtime.api.admin_files import AdminFiles
from thunderserve.runtime.api.app import ApiConfig, create_app
from thunderserve.runtime.api.limits import RequestLimits
from thunderserve.runtime.launch.base import LaunchError
from thunderserve.runtime.launch.serve import ServeConfig, make_controller, served_names
from thunderserve.runtime.launch.supervisor import Supervisor, reap_loop, supervisor_for
from thunderserve.runtime.metrics import RuntimeMetrics
from thunderserve.runtime.vllm.client import GroupClient, VllmGroupClient
from thunderserve.runtime.vllm.instances import InstanceSpec, VllmConfig, instance_specs
from thunderserve.runtime.vllm.launcher import VllmLocalLauncher, free_ports
from thunderserve.runtime.vllm.metrics import InstanceMetricsCollector
from thunderserve.runtime.vllm.router import VllmRouter, VllmRouterConfig

log = logging.getLogger("thunderserve.vllm.deploy")


def resolve_vllm_model(model: str) -> str:
    """A directory vLLM can load: our SmolLM2 (converted from the shipped GGUF once) or a model directory."""
    from thunderserve.runtime.engine.loader import resolve_model_dir

    try:
        return str(resolve_model_dir(model))
    except (FileNotFoundError, ValueError) as exc:
        raise LaunchError(f"--model: {exc}") from None


class VllmDeployment:
    """A plan's vLLM instances plus the router that fronts them."""

    def __init__(self, plan: Plan, config: ServeConfig, vllm: VllmConfig,
                 launcher: VllmLauncher | None = None, progress: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        self.config = config
        self._tmp = tempfile.TemporaryDirectory(prefix="thunderserve-vllm-")
        if vllm.cache_root is None:
            from dataclasses import replace

            vllm = replace(vllm, cache_root=str(Path(self._tmp.name) / "cache"))
        self.vllm = vllm
        if launcher is None:
            if config.backend == "ray":
                from thunderserve.runtime.vllm.ray_launcher import VllmRayLauncher

                launcher = VllmRayLauncher(plan, config.ray_address, use_gpus=config.device == "cuda",
                                           log_dir=Path(self._tmp.name))
            else:
                launcher = VllmLocalLauncher(log_dir=Path(self._tmp.name), progress=progress,
                                             device_count=_local_gpus(config.device))
        self.launcher = launcher
        self.urls: dict[str, str] = {}
        self.router: VllmRouter | None = None

    def start_workers(self) -> dict[str, str]:
        model_dir = resolve_vllm_model(self.config.model)
        ids = sorted(g.id for g in self.plan.groups)
        ports = free_ports(2 * len(ids), self.vllm.host)
        specs = instance_specs(self.plan, model_dir, self.plan.model, self.vllm,
                               {g: (ports[2 * i], ports[2 * i + 1]) for i, g in enumerate(ids)})
        self.urls = self.launcher.start(specs)
        context = _max_model_len(next(iter(self.urls.values())))
        clients: dict[str, GroupClient] = {g: VllmGroupClient(u, self.plan.model) for g, u in self.urls.items()}
        self.router = VllmRouter(self.plan, clients,
                                 VllmRouterConfig(max_retries=self.config.max_retries, max_context_tokens=context),
                                 pids=self.launcher.pids(), on_remove=self.launcher.stop_one,
                                 addresses={g: _host_port(u) for g, u in self.urls.items()},
                                 connect=self._client_at, pid_of=lambda g: self.launcher.pids().get(g, 0))
        return self.urls

    def _client_at(self, host: str, port: int) -> GroupClient:
        """The client of a restarted instance (a fresh connection pool: the old one's connections are dead)."""
        return VllmGroupClient(f"http://{host}:{port}", self.plan.model)

    def supervisor(self) -> Supervisor | None:
        """The supervisor of the instances when `restart_workers` is on and the launcher can restart them."""
        if self.router is None:
            raise RuntimeError("start the instances first")
        return supervisor_for(self.launcher, self.router, sorted(self.urls), self.config.restart_workers)

    def worker_pids(self) -> dict[str, int]:
        return self.launcher.pids()

    def stop(self) -> None:
        self.launcher.stop()
        with contextlib.suppress(OSError):
            self._tmp.cleanup()


class VllmLauncher(Protocol):
    """Starts instances ({group: base URL}), stops one or all (idempotent), reports their process ids."""

    def start(self, specs: list[InstanceSpec]) -> dict[str, str]: ...

    def pids(self) -> dict[str, int]: ...

    def stop_one(self, group_id: str, timeout_s: float = 10.0) -> None: ...

    def stop(self, timeout_s: float = 10.0) -> None: ...


def _local_gpus(device: str) -> int:
    """CUDA devices of this machine vLLM instances are spread over by plan GPU index (0: CPU build)."""
    if device == "cpu":
        return 0
    with contextlib.suppress(Exception):
        import torch

        return int(torch.cuda.device_count())
    return 0


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", int(parts.port or 0)


def _max_model_len(url: str) -> int:
    """The context length the instances serve (from /v1/models)."""
    with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError, TypeError):
        data = httpx.get(f"{url}/v1/models", timeout=10.0, trust_env=False).json()
        return int(data["data"][0]["max_model_len"])
    return 0


def build_vllm_app(dep: VllmDeployment) -> FastAPI:
    """The HTTP app of a deployment whose instances are started; its lifespan runs the router."""
    if dep.router is None:
        raise RuntimeError("start the instances before building the app")
    router = dep.router
    controller = make_controller(dep.plan, dep.config, router) if dep.config.resched else None
    supervisor = dep.supervisor()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.start()
        if controller is not None:
            controller.start()
        reaper = None
        if supervisor is not None:
            supervisor.start()
        else:
            reaper = asyncio.create_task(reap_loop(dep.launcher), name="vllm-reaper")
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

    registry = CollectorRegistry()
    registry.register(InstanceMetricsCollector(router.instance_metrics, lambda: router.steps))
    name, aliases = served_names(dep.plan, dep.config.model)
    files = AdminFiles(Path(dep.config.admin_files_dir) if dep.config.admin_files_dir else None)
    limits = RequestLimits(max_body_bytes=dep.config.max_body_bytes)
    return create_app(router, ApiConfig(name, dep.config.api_key, aliases, limits),
                      metrics=RuntimeMetrics(router, registry),
                      admin=AdminState(router, dep, controller, files), lifespan=lifespan)


def serve_vllm(plan: Plan, config: ServeConfig, vllm: VllmConfig,
               progress: Callable[[str], None] | None = None) -> None:
    """Run the vLLM deployment until SIGINT/SIGTERM (blocking); instances never outlive this call."""
    import uvicorn

    if str(plan.kv_transfer.compression) != "none":
        log.warning("plan asks for %s KV transfer; vLLM's NixlConnector moves the KV cache uncompressed (in the "
                    "cache dtype), so the links carry more than the plan was costed for (plan it with `thunderserve plan --engine vllm`)",
                    plan.kv_transfer.compression)
    dep = VllmDeployment(plan, config, vllm, progress=progress)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    if main:  # while instances load, SIGTERM unwinds like Ctrl-C so the `finally` below stops them
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        dep.start_workers()
        app = build_vllm_app(dep)
        server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                               log_level=config.log_level, lifespan="on"))
        if main:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
        server.run()
    finally:
        dep.stop()
        if main and previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
