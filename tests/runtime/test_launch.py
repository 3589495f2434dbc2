"""Plan -> worker specs, servability checks, the demo plan, and the local process launcher."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from runtime_builders import pd_plan, request, run_request

from thunderserve.errors import PlanError
from thunderserve.plan import KvTransfer, Phase, Routing
from thunderserve.runtime.launch import LaunchError, LocalLauncher, check_servable, group_node, worker_specs
from thunderserve.runtime.launch.demo import demo_plan
from thunderserve.runtime.router import Finished, Router
from thunderserve.runtime.workers.protocol import WorkerConfig
from thunderserve.spec import load_model


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); check its state
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_worker_specs_follow_the_plan() -> None:
    plan = pd_plan(num_prefill=1, num_decode=2).model_copy(update={"kv_transfer": KvTransfer(compression="int8")})
    knobs = WorkerConfig(group_id="-", role=Phase.PREFILL, kv_capacity_tokens=123)
    specs = worker_specs(plan, "fake", cpu_threads=2, knobs=knobs)
    assert [s.config.group_id for s in specs] == ["d0", "d1", "p0"]
    assert [str(s.config.role) for s in specs] == ["decode", "decode", "prefill"]
    assert {str(s.config.compression) for s in specs} == {"int8"}
    assert all(s.config.kv_capacity_tokens == 123 and s.cpu_threads == 2 and s.model == "fake" for s in specs)
    assert group_node(plan.group("d1")) == "n0"


@pytest.mark.parametrize(("routing", "message"), [
    (None, "routing: missing"),
    (Routing(entry={"d0": 1.0}, kv={}), "routing.entry.d0: group is decode"),
    (Routing(entry={"p0": 0.5}, kv={"p0": {"d0": 1.0}}), "routing.entry: shares sum to 0.500000"),
    (Routing(entry={"p0": 1.0}, kv={}), "prefill group 'p0' has no KV destination"),
    (Routing(entry={"p0": 1.0}, kv={"p0": {"zz": 1.0}}), "routing.kv.p0.zz: unknown group"),
    (Routing(entry={"p0": 1.0}, kv={"d0": {"p0": 1.0}}), "routing.kv.d0: not a prefill group"),
])
def test_unservable_plans_name_the_field(routing: Routing | None, message: str) -> None:
    plan = pd_plan().model_copy(update={"routing": routing})
    with pytest.raises(PlanError, match=message.replace(".", r"\.")):
        check_servable(plan)


def test_demo_plan_is_valid_for_smollm2() -> None:
    plan = demo_plan(load_model("smollm2-135m"))
    assert [(g.id, str(g.phase)) for g in plan.groups] == [("p0", "prefill"), ("d0", "decode")]
    assert plan.routing == Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}})
    assert plan.groups[0].stages[0].layers == (0, 30)


def test_local_launcher_runs_processes_and_reaps_them() -> None:
    plan = pd_plan()
    launcher = LocalLauncher(ready_timeout_s=120)
    endpoints = launcher.start(worker_specs(plan, "fake"))
    try:
        pids = launcher.worker_pids()
        assert sorted(endpoints) == ["d0", "p0"] and all(_alive(p) for p in pids.values())
        assert {g: e.pid for g, e in endpoints.items()} == pids and os.getpid() not in pids.values()

        async def use() -> None:
            router = Router(plan, {g: (e.host, e.control_port) for g, e in endpoints.items()})
            router.supervise(["d0", "p0"])
            await router.start()
            try:
                out = await run_request(router, request("over processes", max_tokens=6))
                assert isinstance(out.terminal, Finished) and len(out.token_ids) == 6
                assert {w.group_id: w.pid for w in router.workers()} == pids
                # kill -9, reap, restart from the same spec, re-admit: it serves again
                with pytest.raises(LaunchError, match="still running"):
                    launcher.restart("d0")
                os.kill(pids["d0"], signal.SIGKILL)
                reaped: dict[str, int] = {}
                while not reaped:
                    await asyncio.sleep(0.05)
                    reaped = launcher.reap()
                assert reaped == {"d0": -signal.SIGKILL} and not launcher.is_running("d0")
                endpoint = await asyncio.to_thread(launcher.restart, "d0")
                restarted.append(endpoint.pid)
                assert endpoint.pid != pids["d0"] and launcher.is_running("d0")
                assert router.lost_groups() == ["d0"]
                await router.readmit("d0", endpoint.host, endpoint.control_port)
                out = await run_request(router, request("after a restart", max_tokens=6))
                assert isinstance(out.terminal, Finished) and len(out.token_ids) == 6
                d0 = next(w for w in router.workers() if w.group_id == "d0")
                assert d0.alive and d0.pid == endpoint.pid and d0.restarts == 1 and router.lost_groups() == []
            finally:
                await router.close(shutdown_workers=True)

        restarted: list[int] = []
        asyncio.run(use())
        pids.update({f"d0-restart-{i}": p for i, p in enumerate(restarted)})  # checked gone below too
    finally:
        launcher.stop(timeout_s=10)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids.values())


def test_a_worker_that_cannot_load_fails_the_launch_clearly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    launcher = LocalLauncher(ready_timeout_s=60)
    with pytest.raises(LaunchError, match="worker p0 failed to start"):
        launcher.start(worker_specs(pd_plan(), str(tmp_path / "no-such-model"))[1:])
    assert launcher.worker_pids() == {}


def test_cuda_devices_follow_plan_gpu_indices() -> None:
    from thunderserve.runtime.launch.base import cuda_devices

    plan = pd_plan(num_prefill=1, num_decode=2)  # p0 on n0:0, d0 on n0:1, d1 on n0:2
    assert cuda_devices(plan, 2) == {"p0": ("cuda:0",), "d0": ("cuda:1",), "d1": ("cuda:0",)}
    assert cuda_devices(plan, 0) == {}


def test_ray_actors_number_their_gpus_by_stage_then_rank() -> None:
    """Under Ray an actor sees its GPUs as cuda:0..n-1: rank r of stage s takes cuda:{s*tp + r}; TP groups keep
    their ranks (the actor spawns the followers) unless collapsed."""
    from builders import make_plan
    from thunderserve.runtime.launch.ray import RayLauncher
    from thunderserve.runtime.launch.serve import Deployment, ServeConfig

    plan = make_plan([("c0", "colocated", [["n0:0", "n0:1"], ["n0:2", "n0:3"]], [0, 1, 2]),
                      ("c1", "colocated", [["n1:0"]], [0, 2])], entry={"c0": 0.5, "c1": 0.5})
    dep = Deployment(plan, ServeConfig(model="m", backend="ray", device="cuda"))
    assert isinstance(dep.launcher, RayLauncher)
    assert dep._devices() == {"c0": ("cuda:0", "cuda:2"), "c1": ("cuda:0",)}
    assert dep._rank_devices() == {"c0": (("cuda:0", "cuda:2"), ("cuda:1", "cuda:3"))}
    collapsed = Deployment(plan, ServeConfig(model="m", backend="ray", device="cuda", collapse_tp=True))
    assert collapsed._devices() == {"c0": ("cuda:0", "cuda:1"), "c1": ("cuda:0",)}
    assert collapsed._rank_devices() == {}
    assert Deployment(plan, ServeConfig(model="m", backend="ray", device="cpu"))._rank_devices() == {}
