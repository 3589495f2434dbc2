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

Supervision (`launch.supervisor.SupervisedLauncher`, as the local launcher): `reap` never waits on Ray (it
runs on the server's event loop): each call collects the liveness probes (`WorkerActor.alive`) that
completed and sends new ones; an actor whose process died (kill -9, a crash, its node lost) or whose worker
stopped (then the actor is killed too) is reported once, exit code -9 or 1 (Ray gives no exit code).
`kill` is `ray.kill`; `restart` starts a new actor for the same spec with the same options, so it lands on
a node advertising the same plan node's resource, and fails at once when no live node advertises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Mapping
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

    def alive(self) -> bool:
        """The worker is serving (its thread runs): the supervisor's liveness probe."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)


class ActorProbes:
    """Non-blocking probes of actors: `poll` returns the results of the probes that completed since the last
    call (a value, or the `RayActorError` of a dead actor) and sends a new probe to every actor without one. A
    probe of an actor that was replaced meanwhile is dropped."""

    def __init__(self, method: str) -> None:
        self.method = method
        self._pending: dict[str, tuple[Any, Any]] = {}  # group -> (actor, object ref of its probe)

    def poll(self, actors: Mapping[str, Any]) -> dict[str, Any]:
        import ray
        from ray.exceptions import RayActorError

        results: dict[str, Any] = {}
        refs = [ref for _, ref in self._pending.values()]
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            done = set(ready)
            for gid, (actor, ref) in sorted(self._pending.items()):
                if ref not in done:
                    continue
                del self._pending[gid]
                if actors.get(gid) is not actor:
                    continue
                try:
                    results[gid] = ray.get(ref, timeout=0)
                except RayActorError as exc:
                    results[gid] = exc
        for gid, actor in sorted(actors.items()):
            if gid not in self._pending or self._pending[gid][0] is not actor:
                self._pending[gid] = (actor, getattr(actor, self.method).remote())
        return results


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
        self._specs: dict[str, WorkerLaunchSpec] = {}  # as launched: a restart starts the same spec
        self._probes = ActorProbes("alive")
        self._exited: dict[str, int] = {}  # groups whose actor died or worker stopped (reported by `reap`)
        self._starting: set[str] = set()  # restarts under way (not probed)
        self._lock = threading.Lock()  # `stop` and a restart's actor creation (restarts run on another thread)
        self._stopped = False

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
        try:
            return self._launch(specs)
        except BaseException as exc:
            self.stop()
            if isinstance(exc, LaunchError) or not isinstance(exc, Exception):
                raise
            raise LaunchError(f"Ray workers failed to start: {exc}") from exc

    def _launch(self, specs: list[WorkerLaunchSpec]) -> dict[str, WorkerEndpoint]:
        """One actor per spec on its plan node's resource; wait until each worker reports its ports. On failure
        the actors made here are killed (LaunchError)."""
        ray = self._ensure_ray()
        actor_cls = ray.remote(WorkerActor)
        available = ray.cluster_resources()  # of the live nodes
        futures, made = {}, {}
        try:
            for spec in specs:
                gid = spec.config.group_id
                res = self.resources_for(gid)
                for name in res:
                    if name not in available:
                        raise LaunchError(f"no Ray node advertises resource '{name}' for group {gid} "
                                          f"(start the node with --resources '{{\"{name}\": <gpus>}}')")
                # one GPU per pipeline stage and tensor-parallel rank (the rank-0 actor spawns its followers)
                num_gpus = float(self.plan.group(gid).pp * max(spec.tp, 1)) if self.use_gpus else 0.0
                with self._lock:
                    if self._stopped:
                        raise LaunchError("the launcher is stopped")
                    actor = actor_cls.options(num_cpus=0, num_gpus=num_gpus, resources=res).remote()
                    made[gid] = actor
                    self._actors[gid] = actor
                self._specs[gid] = spec
                futures[gid] = actor.start.remote(spec, self.ready_timeout_s)
            endpoints: dict[str, WorkerEndpoint] = {}
            for gid, fut in futures.items():
                info = ray.get(fut, timeout=self.ready_timeout_s + 60)
                if "error" in info:
                    raise LaunchError(f"worker {gid} failed to start: {info['error']}")
                self._pids[gid] = int(info["pid"])
                self.node_ids[gid] = str(info["node_id"])
                endpoints[gid] = WorkerEndpoint(gid, info["host"], info["control_port"], info["kv_port"],
                                                info["pid"], info["weights_token"],
                                                group_node(self.plan.group(gid)))
        except BaseException:
            for actor in made.values():
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            raise
        return dict(sorted(endpoints.items()))

    # ---- supervision (launch.supervisor.SupervisedLauncher) ----------------------------------------------
    def restart(self, group_id: str) -> WorkerEndpoint:
        """A new actor for the group's spec, placed like the first (blocking until its worker is ready); on
        failure it is killed. Its old actor must be dead (reported by `reap`)."""
        if self.is_running(group_id):
            raise LaunchError(f"worker {group_id} is still running; not restarting it")
        self._starting.add(group_id)
        try:
            endpoint = self._launch([self._specs[group_id]])[group_id]
        except LaunchError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's errors (actor died while loading, timeout) become one line
            raise LaunchError(f"worker {group_id} failed to restart: {type(exc).__name__}: {exc}") from exc
        finally:
            self._starting.discard(group_id)
        self._exited.pop(group_id, None)
        return endpoint

    def reap(self) -> dict[str, int]:
        """Workers whose actor died (-9) or whose worker stopped (1; its actor is killed) since the last call."""
        if not self._actors or self._stopped:
            return {}
        import ray
        from ray.exceptions import RayActorError

        watched = {g: a for g, a in self._actors.items() if g not in self._exited and g not in self._starting}
        dead = {}
        for gid, result in self._probes.poll(watched).items():
            if result is True:
                continue
            if not isinstance(result, RayActorError):
                with contextlib.suppress(Exception):
                    ray.kill(watched[gid], no_restart=True)
            dead[gid] = self._exited[gid] = -9 if isinstance(result, RayActorError) else 1
        return dead

    def is_running(self, group_id: str) -> bool:
        return group_id in self._actors and group_id not in self._exited

    def kill(self, group_id: str) -> None:
        """Kill the group's actor (and so its worker); a later `reap` reports it."""
        actor = self._actors.get(group_id)
        if actor is not None and group_id not in self._exited:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def worker_pids(self) -> dict[str, int]:
        return dict(sorted(self._pids.items()))

    def stop(self, timeout_s: float = 10.0) -> None:
        import ray

        with self._lock:
            self._stopped = True
        if not self._actors:
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
            return

        refs = [a.stop.remote() for g, a in self._actors.items() if g not in self._exited]
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
