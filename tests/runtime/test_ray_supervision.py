"""Supervision on the Ray backend (slow: a local Ray cluster, one node advertising plan node n0's resource).

Built-in engine: kill -9 of a worker's actor process is noticed without blocking the event loop, a new actor
for the same spec lands on the node advertising n0 and the router routes to it again (the same `Supervisor`
as the local backend). vLLM engine (a stand-in instance process, fake_vllm_instance.py: the launcher's
mechanics, not vLLM's): an instance killed inside its live actor is restarted there, same port; when the
actor itself dies, a new actor starts the same spec; nothing outlives `stop`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from runtime_builders import pid_alive, request, run_request, wait_gone

from builders import make_plan
from thunderserve.runtime.kv.transport import new_secret
from thunderserve.runtime.launch import worker_specs
from thunderserve.runtime.launch.supervisor import RestartPolicy, Supervisor
from thunderserve.runtime.router import Finished, Router, RouterConfig
from thunderserve.runtime.vllm.instances import InstanceSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
FAKE_INSTANCE = Path(__file__).resolve().parent / "fake_vllm_instance.py"
PLAN = make_plan([("p0", "prefill", [["n0:0"]], [0, 2]), ("d0", "decode", [["n0:1"]], [0, 2])],
                 entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}})


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from thunderserve.runtime.launch.ray import node_resource

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {node_resource("n0"): 2}, "object_store_memory": 80 * 1024**2,
        "include_dashboard": False})
    try:
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def wait_for(cond: Callable[[], Any], what: str, timeout_s: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (out := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return out


def test_builtin_worker_actor_killed_is_restarted_on_its_node_and_serves_again(cluster: Any) -> None:
    from thunderserve.runtime.launch.ray import RayLauncher

    secret = new_secret()
    launcher = RayLauncher(PLAN, address=cluster.address, ready_timeout_s=180)
    try:
        endpoints = launcher.start(worker_specs(PLAN, "fake", secret=secret))
        head = cluster.head_node.node_id
        assert launcher.node_ids == {"d0": head, "p0": head} and launcher.reap() == {}  # probes sent, none back

        async def use() -> tuple[int, int]:
            router = Router(PLAN, {g: (e.host, e.control_port) for g, e in endpoints.items()},
                            RouterConfig(max_retries=3, heartbeat_timeout_s=30), secret=secret)
            await router.start()
            router.supervise(["d0", "p0"])
            sup = Supervisor(launcher, router, ["d0", "p0"], RestartPolicy(initial_backoff_s=0.2), interval_s=0.1)
            sup.start()
            try:
                assert isinstance((await run_request(router, request("before", max_tokens=4))).terminal, Finished)
                old = launcher.worker_pids()["d0"]
                os.kill(old, signal.SIGKILL)  # the actor process (its worker runs on a thread of it)
                deadline = asyncio.get_running_loop().time() + 180
                while not any(w.group_id == "d0" and w.alive and w.restarts == 1 for w in router.workers()):
                    assert asyncio.get_running_loop().time() < deadline, "d0 never came back"
                    await asyncio.sleep(0.1)
                out = await run_request(router, request("after", max_tokens=4))
                assert isinstance(out.terminal, Finished) and len(out.token_ids) == 4
                d0 = next(w for w in router.workers() if w.group_id == "d0")
                assert d0.held_requests == 0 and d0.role == "decode"
                return old, launcher.worker_pids()["d0"]
            finally:
                await sup.stop()
                await router.close(shutdown_workers=True)

        old, new = asyncio.run(use())
        assert new != old and launcher.node_ids["d0"] == cluster.head_node.node_id  # on n0's node again
    finally:
        launcher.stop()


def fake_instance_spec(tmp: Path) -> InstanceSpec:
    argv = (sys.executable, str(FAKE_INSTANCE), "--host", "127.0.0.1", "--port", "0")
    return InstanceSpec("d0", "n0", argv, {}, "127.0.0.1", 0, 0)


def test_vllm_instance_restarted_in_its_actor_and_by_a_new_actor_when_the_actor_dies(
        cluster: Any, tmp_path: Path) -> None:
    from thunderserve.runtime.vllm.ray_launcher import VllmRayLauncher

    plan = make_plan([("d0", "colocated", [["n0:0"]], [0, 2])], entry={"d0": 1.0})
    launcher = VllmRayLauncher(plan, address=cluster.address, log_dir=tmp_path, ready_timeout_s=120)
    pids: list[int] = []
    try:
        url = launcher.start([fake_instance_spec(tmp_path)])["d0"]
        first = launcher.pids()["d0"]
        pids.append(first)
        assert launcher.is_running("d0") and launcher.reap() == {}

        os.kill(first, signal.SIGKILL)  # the instance dies; its actor lives
        assert wait_for(launcher.reap, "the instance's exit") == {"d0": -9}
        assert not launcher.is_running("d0") and not pid_alive(first)
        endpoint = launcher.restart("d0")
        pids.append(endpoint.pid)
        assert f"http://{endpoint.host}:{endpoint.control_port}" == url  # inside the same actor: same port
        assert endpoint.pid != first and httpx.get(f"{url}/health", timeout=5).status_code == 200

        actor_pid = _parent(endpoint.pid)
        os.kill(actor_pid, signal.SIGKILL)  # now the actor dies (its instance gets SIGTERM with it)
        assert wait_for(launcher.reap, "the actor's death") == {"d0": -9}
        endpoint2 = launcher.restart("d0")  # a new actor, on the node advertising n0
        pids.append(endpoint2.pid)
        assert _parent(endpoint2.pid) != actor_pid and launcher.is_running("d0")
        new_url = f"http://{endpoint2.host}:{endpoint2.control_port}"
        assert httpx.get(f"{new_url}/health", timeout=5).status_code == 200
        assert launcher.node_ids["d0"] == cluster.head_node.node_id
    finally:
        launcher.stop()
    assert wait_gone(pids, 20) == [], "an instance outlived the launcher"


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])
