"""Ray backend: workers as actors placed on the Ray nodes standing for the plan's nodes (two fake nodes)."""

from __future__ import annotations

import asyncio

import pytest
from runtime_builders import request, run_request

from builders import make_plan
from thunderserve.runtime.launch import LaunchError, worker_specs
from thunderserve.runtime.router import Finished, Router

pytestmark = pytest.mark.slow


def test_ray_launcher_places_groups_on_their_nodes_and_serves() -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from thunderserve.runtime.launch.ray import RayLauncher, node_resource

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {node_resource("n0"): 1}, "object_store_memory": 80 * 1024**2,
        "include_dashboard": False})
    node1 = cluster.add_node(num_cpus=1, resources={node_resource("n1"): 1}, object_store_memory=80 * 1024**2)
    head_id = cluster.head_node.node_id
    plan = make_plan([("p0", "prefill", [["n0:0"]], [0, 2]), ("d0", "decode", [["n1:0"]], [0, 2])],
                     entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}})
    launcher = RayLauncher(plan, address=cluster.address, ready_timeout_s=120)
    try:
        endpoints = launcher.start(worker_specs(plan, "fake"))
        assert launcher.node_ids == {"d0": node1.node_id, "p0": head_id}
        assert {g: e.node for g, e in endpoints.items()} == {"d0": "n1", "p0": "n0"}

        async def use() -> None:
            router = Router(plan, {g: (e.host, e.control_port) for g, e in endpoints.items()})
            await router.start()
            try:
                out = await run_request(router, request("over ray", max_tokens=6))
                assert isinstance(out.terminal, Finished) and len(out.token_ids) == 6
                d0 = next(w for w in router.workers() if w.group_id == "d0")
                assert d0.pid == launcher.worker_pids()["d0"]
            finally:
                await router.close()

        asyncio.run(use())
        missing = make_plan([("p0", "colocated", [["n9:0"]], [0, 2])], entry={"p0": 1.0})
        with pytest.raises(LaunchError, match="ts_node_n9"):
            RayLauncher(missing, address=cluster.address).start(worker_specs(missing, "fake"))
    finally:
        launcher.stop()
        ray.shutdown()
        cluster.shutdown()
