"""Ray launcher of vLLM instances: each group's instance runs on the Ray node standing for its plan node.

Placement is the built-in engine's (`runtime.launch.ray`): a Ray node hosting plan node `<name>` advertises
the custom resource `ts_node_<name>` (one unit per GPU), and a group's actor asks for one unit per GPU it uses
there, plus (with GPUs) tp x pp GPUs, which Ray exposes to the actor - and so to the vLLM process it starts -
through CUDA_VISIBLE_DEVICES. The actor starts the instance with the local launcher on its node (free ports
picked there; bound to the spec's host; with 0.0.0.0 it advertises the node's IP, also as the NIXL side-channel
host decode instances read KV from). The actor stops its instance when stopped; actors die with the driver.
vLLM's environment (`--vllm-python`) and the model directory must exist at the same paths on every node.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from thunderserve.plan.model import Plan
from thunderserve.runtime.launch.base import LaunchError
from thunderserve.runtime.launch.ray import node_resource
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

    def start(self, spec: InstanceSpec, log_dir: str, timeout_s: float) -> dict[str, Any]:
        import ray

        ip = ray.util.get_node_ip_address()
        ports = free_ports(2, "0.0.0.0" if spec.host in ("0.0.0.0", "::") else spec.host)
        spec = respec_on_node(spec, ip, (ports[0], ports[1]))
        self._launcher = VllmLocalLauncher(log_dir=Path(log_dir), ready_timeout_s=timeout_s)
        try:
            self._launcher.start([spec])
        except LaunchError as exc:
            return {"error": str(exc)}
        host = ip if spec.host in ("0.0.0.0", "::") else spec.host
        return {"url": f"http://{host}:{spec.port}", "pid": self._launcher.pids().get(spec.group_id, 0),
                "node_id": ray.get_runtime_context().get_node_id()}

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
        ray = self._ray()
        actor_cls = ray.remote(VllmInstanceActor)
        available = ray.cluster_resources()
        futures = {}
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
                actor = actor_cls.options(num_cpus=0, num_gpus=num_gpus, resources=res).remote()
                self._actors[spec.group_id] = actor
                futures[spec.group_id] = actor.start.remote(spec, str(self.log_dir), self.ready_timeout_s)
            urls = {}
            for gid, fut in sorted(futures.items()):
                info = ray.get(fut, timeout=self.ready_timeout_s + 60)
                if "error" in info:
                    raise LaunchError(f"vLLM instance of group {gid} failed to start: {info['error']}")
                urls[gid] = str(info["url"])
                self._pids[gid] = int(info["pid"])
                self.node_ids[gid] = str(info["node_id"])
            return urls
        except BaseException as exc:
            self.stop()
            if isinstance(exc, LaunchError):
                raise
            raise LaunchError(f"Ray vLLM instances failed to start: {exc}") from exc

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

        for gid in sorted(self._actors):
            self.stop_one(gid, timeout_s)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
