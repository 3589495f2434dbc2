"""Ray launcher of vLLM instances: each group's instance runs on the Ray node standing for its plan node.

Placement is the built-in engine's (`runtime.launch.ray`): a Ray node hosting plan node `<name>` advertises
the custom resource `ts_node_<name>` (one unit per GPU), and a group's actor asks for one unit per GPU it uses
there, plus (with GPUs) tp x pp GPUs, which Ray exposes to the actor - and so to the vLLM process it starts -
through CUDA_VISIBLE_DEVICES. The actor starts the instance with the local launcher on its node (free ports
picked there; bound to the spec's host; with 0.0.0.0 it advertises the node's IP, also as the NIXL side-channel
host decode instances read KV from). The actor stops its instance when stopped; actors die with the driver.
vLLM's environment (`--vllm-python`) and the model directory must exist at the same paths on every node.

Supervision (`launch.supervisor.SupervisedLauncher`): `reap` never waits on Ray: each call collects the probes
that completed (`VllmInstanceActor.reap`: its local launcher's reap, which kills the dead instance's process
group) and sends new ones; an instance that exited is reported with its exit code, an actor that died (its
node lost, the actor killed) with -9. `restart` restarts the instance inside its actor (same node, same ports)
or, when the actor is gone, starts a new actor for the same spec on the same plan node's resource (ports free
there); `kill` is SIGKILL to the instance's process group, or `ray.kill` when the actor does not answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import Any

from thunderserve.plan.model import Plan
from thunderserve.runtime.launch.base import LaunchError, WorkerEndpoint
from thunderserve.runtime.launch.ray import ActorProbes, node_resource
from thunderserve.runtime.vllm.instances import InstanceSpec
from thunderserve.runtime.vllm.launcher import DEFAULT_READY_TIMEOUT_S, VllmLocalLauncher, free_ports


def respec_on_node(spec: InstanceSpec, node_ip: str, ports: tuple[int, int]) -> InstanceSpec:
    """The spec with ports free on this node and, when bound to all interfaces, this node's IP advertised."""
    argv = list(spec.argv)
    argv[argv.index("--port") + 1] = str(ports[0])
    env = dict(spec.env)
    env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(ports[1])
    advertised = node_ip if spec.host in ("0.0.0.0", "::") else spec.host
    env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = advertised
    return dataclasses.replace(spec, argv=tuple(argv), env=env, port=ports[0], side_channel_port=ports[1])


class VllmInstanceActor:
    """Ray actor body: one vLLM instance (a child process of the actor) on this node."""

    def __init__(self) -> None:
        self._launcher: VllmLocalLauncher | None = None
        self._spec: InstanceSpec | None = None
        self._host = ""

    def start(self, spec: InstanceSpec, log_dir: str, timeout_s: float) -> dict[str, Any]:
        import ray

        ip = ray.util.get_node_ip_address()
        ports = free_ports(2, "0.0.0.0" if spec.host in ("0.0.0.0", "::") else spec.host)
        spec = respec_on_node(spec, ip, (ports[0], ports[1]))
        self._launcher = VllmLocalLauncher(log_dir=Path(log_dir), ready_timeout_s=timeout_s)
        self._spec, self._host = spec, ip if spec.host in ("0.0.0.0", "::") else spec.host
        try:
            self._launcher.start([spec])
        except LaunchError as exc:
            return {"error": str(exc)}
        return self._info()

    def _info(self) -> dict[str, Any]:
        import ray

        assert self._launcher is not None and self._spec is not None
        return {"url": f"http://{self._host}:{self._spec.port}", "host": self._host, "port": self._spec.port,
                "side_channel_port": self._spec.side_channel_port,
                "pid": self._launcher.pids().get(self._spec.group_id, 0),
                "node_id": ray.get_runtime_context().get_node_id()}

    def reap(self) -> dict[str, int]:
        """The instance exited since the last call: {group: exit code} (its process group killed, collected)."""
        return self._launcher.reap() if self._launcher is not None else {}

    def kill(self) -> None:
        if self._launcher is not None and self._spec is not None:
            self._launcher.kill(self._spec.group_id)

    def restart(self) -> dict[str, Any]:
        """Start the instance again on this node, same spec and ports (its old process must have exited)."""
        if self._launcher is None or self._spec is None:
            return {"error": "the instance was never started"}
        try:
            self._launcher.restart(self._spec.group_id)
        except LaunchError as exc:
            return {"error": str(exc)}
        return self._info()

    def stop(self) -> None:
        if self._launcher is not None:
            self._launcher.stop()


class VllmRayLauncher:
    """Starts one vLLM instance per group as Ray actors on the nodes the plan names."""

    def __init__(self, plan: Plan, address: str | None = None, use_gpus: bool = False, log_dir: Path | None = None,
                 ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        self.plan = plan
        self.address = address
        self.use_gpus = use_gpus
        self.log_dir = log_dir or Path("/tmp")
        self.ready_timeout_s = ready_timeout_s
        self._actors: dict[str, Any] = {}
        self._pids: dict[str, int] = {}
        self.node_ids: dict[str, str] = {}
        self._owns_ray = False
        self._specs: dict[str, InstanceSpec] = {}  # as given: a new actor for a lost one starts the same spec
        self._probes = ActorProbes("reap")
        self._exited: dict[str, int] = {}  # groups whose instance exited or whose actor died (reported)
        self._actor_dead: set[str] = set()  # ... and of those, the ones whose actor is gone too
        self._starting: set[str] = set()  # restarts under way (not probed)
        self._lock = threading.Lock()
        self._stopped = False

    def _ray(self) -> Any:
        import ray

        if not ray.is_initialized():
            self._owns_ray = True
            if self.address is None:  # a local Ray standing for every plan node
                nodes: dict[str, float] = {}
                for g in self.plan.groups:
                    for gpu in g.gpus:
                        key = node_resource(gpu.split(":", 1)[0])
                        nodes[key] = nodes.get(key, 0.0) + 1.0
                ray.init(resources=nodes, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        return ray

    def start(self, specs: list[InstanceSpec]) -> dict[str, str]:
        try:
            return {gid: str(info["url"]) for gid, info in self._launch(specs).items()}
        except BaseException as exc:
            self.stop()
            if isinstance(exc, LaunchError) or not isinstance(exc, Exception):
                raise
            raise LaunchError(f"Ray vLLM instances failed to start: {exc}") from exc

    def _launch(self, specs: list[InstanceSpec]) -> dict[str, dict[str, Any]]:
        """One actor per spec on its plan node's resource; wait until each instance serves. On failure the
        actors made here are stopped and killed (LaunchError)."""
        ray = self._ray()
        actor_cls = ray.remote(VllmInstanceActor)
        available = ray.cluster_resources()  # of the live nodes
        futures, made = {}, {}
        try:
            for spec in specs:
                group = self.plan.group(spec.group_id)
                units = float(sum(1 for g in group.gpus if g.split(":", 1)[0] == spec.node))
                res = {node_resource(spec.node): units}
                if node_resource(spec.node) not in available:
                    raise LaunchError(f"no Ray node advertises resource '{node_resource(spec.node)}' for group "
                                      f"{spec.group_id} (start the node with --resources "
                                      f"'{{\"{node_resource(spec.node)}\": <gpus>}}')")
                num_gpus = float(spec.tp * spec.pp) if self.use_gpus else 0.0
                with self._lock:
                    if self._stopped:
                        raise LaunchError("the launcher is stopped")
                    actor = actor_cls.options(num_cpus=0, num_gpus=num_gpus, resources=res).remote()
                    made[spec.group_id] = self._actors[spec.group_id] = actor
                self._specs[spec.group_id] = spec
                futures[spec.group_id] = actor.start.remote(spec, str(self.log_dir), self.ready_timeout_s)
            infos = {}
            for gid, fut in sorted(futures.items()):
                info = ray.get(fut, timeout=self.ready_timeout_s + 60)
                if "error" in info:
                    raise LaunchError(f"vLLM instance of group {gid} failed to start: {info['error']}")
                self._pids[gid] = int(info["pid"])
                self.node_ids[gid] = str(info["node_id"])
                infos[gid] = info
            return infos
        except BaseException:
            for actor in made.values():
                with contextlib.suppress(Exception):
                    ray.get(actor.stop.remote(), timeout=30)
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            raise

    # ---- supervision (launch.supervisor.SupervisedLauncher) ----------------------------------------------
    def reap(self) -> dict[str, int]:
        """Instances that exited (their exit code) or whose actor died (-9) since the last call."""
        if not self._actors or self._stopped:
            return {}
        from ray.exceptions import RayActorError

        watched = {g: a for g, a in self._actors.items() if g not in self._exited and g not in self._starting}
        dead = {}
        for gid, result in self._probes.poll(watched).items():
            if isinstance(result, RayActorError):
                self._actor_dead.add(gid)
                dead[gid] = self._exited[gid] = -9
            elif gid in result:
                dead[gid] = self._exited[gid] = int(result[gid])
        return dead

    def is_running(self, group_id: str) -> bool:
        return group_id in self._actors and group_id not in self._exited

    def kill(self, group_id: str) -> None:
        """SIGKILL the instance's process group (through its actor); a later `reap` reports it."""
        actor = self._actors.get(group_id)
        if actor is not None and group_id not in self._exited:
            actor.kill.remote()

    def restart(self, group_id: str) -> WorkerEndpoint:
        """The group's instance again: inside its actor when that lives (same node and ports), else from a new
        actor for the same spec (same plan node, free ports there); blocking until it serves /health."""
        import ray

        if self.is_running(group_id):
            raise LaunchError(f"vLLM instance of group {group_id} is still running; not restarting it")
        self._starting.add(group_id)
        try:
            actor = self._actors.get(group_id)
            if actor is not None and group_id not in self._actor_dead:
                info = ray.get(actor.restart.remote(), timeout=self.ready_timeout_s + 60)
                if "error" in info:
                    raise LaunchError(f"vLLM instance of group {group_id} failed to restart: {info['error']}")
                self._pids[group_id] = int(info["pid"])
            else:
                if actor is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
                info = self._launch([self._specs[group_id]])[group_id]
        except LaunchError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's errors (actor died while loading, timeout) become one line
            raise LaunchError(f"vLLM instance of group {group_id} failed to restart: {type(exc).__name__}: "
                              f"{exc}") from exc
        finally:
            self._starting.discard(group_id)
        self._exited.pop(group_id, None)
        self._actor_dead.discard(group_id)
        return WorkerEndpoint(group_id, str(info["host"]), int(info["port"]), int(info["side_channel_port"]),
                              int(info["pid"]), 0, self._specs[group_id].node)

    def pids(self) -> dict[str, int]:
        return dict(sorted(self._pids.items()))

    def worker_pids(self) -> dict[str, int]:
        return self.pids()

    def stop_one(self, group_id: str, timeout_s: float = 10.0) -> None:
        import ray

        actor = self._actors.pop(group_id, None)
        if actor is not None:
            try:
                ray.get(actor.stop.remote(), timeout=timeout_s + 20)
            except Exception:  # noqa: BLE001 - killing the actor below is the fallback
                pass
            ray.kill(actor)

    def stop(self, timeout_s: float = 10.0) -> None:
        import ray

        with self._lock:
            self._stopped = True
        for gid in sorted(self._actors):
            self.stop_one(gid, timeout_s)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
