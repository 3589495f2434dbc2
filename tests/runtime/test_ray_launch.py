"""Ray backend: workers as actors placed on the Ray nodes standing for the plan's nodes (two fake nodes); a
tensor-parallel group's actor runs its follower ranks on its node and gives the same tokens as `transformers`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
from runtime_builders import child_pids, pid_alive, request, run_request, wait_gone

from builders import make_plan
from thunderserve.runtime.launch import LaunchError, worker_specs
from thunderserve.runtime.router import Finished, Router

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from tiny_llama import build_tiny_llama, reference_greedy  # noqa: E402

pytestmark = pytest.mark.slow


def test_ray_launcher_places_groups_on_their_nodes_and_serves(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from thunderserve.runtime.launch.ray import RayLauncher, node_resource

    model_dir = build_tiny_llama(tmp_path / "tiny-llama")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {node_resource("n0"): 2}, "object_store_memory": 80 * 1024**2,
        "include_dashboard": False})
    node1 = cluster.add_node(num_cpus=1, resources={node_resource("n1"): 1}, object_store_memory=80 * 1024**2)
    head_id = cluster.head_node.node_id
    # p0: prefill at TP=2 on n0 (its actor is rank 0, the follower a child process); d0: decode on n1
    plan = make_plan([("p0", "prefill", [["n0:0", "n0:1"]], [0, 2]), ("d0", "decode", [["n1:0"]], [0, 2])],
                     entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}})
    launcher = RayLauncher(plan, address=cluster.address, ready_timeout_s=180)
    followers: list[int] = []
    try:
        specs = worker_specs(plan, str(model_dir))
        assert {s.config.group_id: s.tp for s in specs} == {"p0": 2, "d0": 1}
        endpoints = launcher.start(specs)
        followers = child_pids(endpoints["p0"].pid, spawned_only=True)
        assert len(followers) == 1 and pid_alive(followers[0])
        assert launcher.node_ids == {"d0": node1.node_id, "p0": head_id}
        assert {g: e.node for g, e in endpoints.items()} == {"d0": "n1", "p0": "n0"}

        async def use() -> None:
            router = Router(plan, {g: (e.host, e.control_port) for g, e in endpoints.items()})
            await router.start()
            try:
                from thunderserve.runtime.workers.server import build_engine

                for prompt in ("over ray", "tell me a story"):
                    out = await run_request(router, request(prompt, max_tokens=6))
                    assert isinstance(out.terminal, Finished) and len(out.token_ids) == 6
                    ids = build_engine(str(model_dir)).encode(prompt)
                    assert out.token_ids == reference_greedy(model_dir, ids, 6), prompt
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
    assert wait_gone(followers, 15) == [], "a TP follower outlived its Ray actor"
