"""Ray launcher: each plan group's worker is a Ray actor placed on the Ray node standing for its plan node.

Placement convention: a Ray node that hosts plan node `<name>` advertises the custom resource
`ts_node_<name>` (e.g. `ray start --resources '{"ts_node_n0": 8}'`, one unit per GPU), and a group's actor
asks for one unit of its node's resource per GPU it uses there. The actor runs the same `serve_worker` as a
local process, on a thread with its own event loop; the router reaches it over TCP as usual. A tensor-parallel
group's actor is its rank 0 and spawns the follower ranks as child processes on the same node (TP stays inside
a node, over gloo or NCCL as locally); with GPUs it asks Ray for stages x ranks GPUs. Workers bound to 0.0.0.0
advertise their node's IP. Actors are owned by the driver, so they die with it (no orphans; followers exit
when their rank 0 does).
The model path must exist on every node. Without an address, a local Ray is started that advertises every
plan node's resource (the whole plan on this machine).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from thunderserve.plan.model import Plan
from thunderserve.runtime.launch.base import LaunchError, WorkerEndpoint, group_node
from thunderserve.runtime.workers.server import WorkerLaunchSpec, serve_worker

NODE_RESOURCE_PREFIX = "ts_node_"
DEFAULT_READY_TIMEOUT_S = 300.0


def node_resource(node: str) -> str:
    """The Ray custom resource naming plan node `node`."""
    return f"{NODE_RESOURCE_PREFIX}{node}"


class WorkerActor:
    """Ray actor body: one worker served on a background thread of the actor process."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._info: dict[str, Any] = {}
        self._thread: threading.Thread | None = None

    def start(self, spec: WorkerLaunchSpec, timeout_s: float) -> dict[str, Any]:
        import dataclasses

        import ray

        if spec.host in ("0.0.0.0", "::") and spec.advertise_host is None:
            spec = dataclasses.replace(spec, advertise_host=ray.util.get_node_ip_address())

        def on_ready(info: dict[str, Any]) -> None:
            self._info = info
            self._ready.set()

        def body() -> None:
            try:
                asyncio.run(serve_worker(spec, on_ready, watch_parent=False, stop_event=self._stop))
            except BaseException as exc:  # noqa: BLE001
                self._info = {"error": f"{type(exc).__name__}: {exc}"}
                self._ready.set()

        self._thread = threading.Thread(target=body, name=f"ts-worker-{spec.config.group_id}", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"worker {spec.config.group_id} not ready after {timeout_s:g} s")
        info = dict(self._info)
        info["node_id"] = ray.get_runtime_context().get_node_id()
        return info

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)


class RayLauncher:
    """Starts workers as Ray actors on the nodes the plan names (see module docstring)."""

    def __init__(self, plan: Plan, address: str | None = None, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
                 use_gpus: bool = False) -> None:
        self.plan = plan
        self.address = address
        self.ready_timeout_s = ready_timeout_s
        self.use_gpus = use_gpus  # ask Ray for one GPU per pipeline stage of each group
        self._actors: dict[str, Any] = {}
        self._pids: dict[str, int] = {}
        self._owns_ray = False  # started Ray itself (so shuts it down in stop)
        self.node_ids: dict[str, str] = {}  # group -> Ray node id it landed on

    def _ensure_ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            self._owns_ray = True
            if self.address is None:  # a local Ray started here stands for every plan node
                nodes: dict[str, float] = {}
                for g in self.plan.groups:
                    for gpu in g.gpus:
                        key = node_resource(gpu.split(":", 1)[0])
                        nodes[key] = nodes.get(key, 0.0) + 1.0
                ray.init(resources=nodes, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        return ray

    def resources_for(self, group_id: str) -> dict[str, float]:
        group = self.plan.group(group_id)
        node = group_node(group)
        units = sum(1 for g in group.gpus if g.split(":", 1)[0] == node)
        return {node_resource(node): float(units)}

    def start(self, specs: list[WorkerLaunchSpec]) -> dict[str, WorkerEndpoint]:
        ray = self._ensure_ray()
        actor_cls = ray.remote(WorkerActor)
        available = ray.cluster_resources()
        futures = {}
        for spec in specs:
            gid = spec.config.group_id
            res = self.resources_for(gid)
            for name in res:
                if name not in available:
                    self.stop()
                    raise LaunchError(f"no Ray node advertises resource '{name}' for group {gid} "
                                      f"(start the node with --resources '{{\"{name}\": <gpus>}}')")
            # one GPU per pipeline stage and tensor-parallel rank (the rank-0 actor spawns its followers)
            num_gpus = float(self.plan.group(gid).pp * max(spec.tp, 1)) if self.use_gpus else 0.0
            actor = actor_cls.options(num_cpus=0, num_gpus=num_gpus, resources=res).remote()
            self._actors[gid] = actor
            futures[gid] = actor.start.remote(spec, self.ready_timeout_s)
        endpoints: dict[str, WorkerEndpoint] = {}
        try:
            for gid, fut in futures.items():
                info = ray.get(fut, timeout=self.ready_timeout_s + 60)
                if "error" in info:
                    raise LaunchError(f"worker {gid} failed to start: {info['error']}")
                self._pids[gid] = int(info["pid"])
                self.node_ids[gid] = str(info["node_id"])
                endpoints[gid] = WorkerEndpoint(gid, info["host"], info["control_port"], info["kv_port"],
                                                info["pid"], info["weights_token"],
                                                group_node(self.plan.group(gid)))
        except Exception as exc:
            self.stop()
            if isinstance(exc, LaunchError):
                raise
            raise LaunchError(f"Ray workers failed to start: {exc}") from exc
        return dict(sorted(endpoints.items()))

    def worker_pids(self) -> dict[str, int]:
        return dict(sorted(self._pids.items()))

    def stop(self, timeout_s: float = 10.0) -> None:
        import ray

        if not self._actors:
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
            return

        refs = [a.stop.remote() for a in self._actors.values()]
        try:
            ray.get(refs, timeout=timeout_s)
        except Exception:  # noqa: BLE001 - killing below is the fallback
            pass
        for actor in self._actors.values():
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001
                pass
        self._actors.clear()
        if self._owns_ray:
            ray.shutdown()
