"""Supervision: the controller never crashes its loop (losing every worker is one line, a tick that raises is
logged and the loop goes on); a killed worker is restarted, re-admitted and serves again; a worker that was only
late gets back in when it answers again. (The same with real processes and kill -9: tests/e2e/test_chaos.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from runtime_builders import collect, fake_deployment, pd_plan, request, run_request
from test_controller import CLUSTER, MODEL, PLAN, SLO, Clock, make_controller, workload  # tests/unit/resched

from thunderserve.plan import Plan
from thunderserve.resched.actuator import FakeActuator, RouterActuator
from thunderserve.resched.controller import ControllerConfig, ReplanContext, ReschedController
from thunderserve.resched.reconcile import DeploymentState
from thunderserve.runtime.api.admin import AdminState
from thunderserve.runtime.fakes import FakeEngine, RawKvCodec
from thunderserve.runtime.kv.transport import new_secret
from thunderserve.runtime.launch.base import WorkerEndpoint
from thunderserve.runtime.launch.supervisor import RestartPolicy, Supervisor
from thunderserve.runtime.router import Failed, Finished, Router, RouterConfig
from thunderserve.runtime.workers.protocol import WorkerConfig
from thunderserve.runtime.workers.server import WorkerServer

pytestmark = pytest.mark.anyio


def test_losing_every_worker_is_recorded_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    ctl, fake, clock = make_controller()
    for g in PLAN.groups:
        fake.kill(g.id)
    clock.now_s = 1.0
    with caplog.at_level(logging.ERROR, logger="thunderserve.resched"):
        record = asyncio.run(ctl.tick())
    assert record is not None and record.path == "none" and "no group of the plan survives" in record.error
    assert ctl.target == PLAN and record.actions == ()  # kept, so returning workers can be reconciled to it
    assert all(r.exc_info is None for r in caplog.records)
    clock.now_s = 2.0
    assert asyncio.run(ctl.tick()) is None  # handled once; the loop goes on


# ---- the loop outlives a tick that raises -------------------------------------------------------------------
@dataclass
class _FlakyActuator(FakeActuator):
    raises: int = 0  # this many state reads raise (a deployment that cannot be read for a while)

    def state(self) -> DeploymentState:
        if self.raises:
            self.raises -= 1
            raise RuntimeError("actuator exploded")
        return super().state()


async def test_the_controller_loop_outlives_ticks_that_raise(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    fake = _FlakyActuator(DeploymentState.from_plan(PLAN), refuse_starts=True, raises=3)
    ctl = ReschedController(fake, PLAN, ReplanContext(CLUSTER, MODEL, SLO, workload()), ControllerConfig(tick_s=0.01),
                            clock=clock)
    fake.kill("d1")
    with caplog.at_level(logging.ERROR, logger="thunderserve.resched"):
        ctl.start()
        deadline = asyncio.get_running_loop().time() + 30
        while not ctl.history:
            assert asyncio.get_running_loop().time() < deadline, "the controller never acted"
            await asyncio.sleep(0.01)
        running = ctl._task is not None and not ctl._task.done()
        await ctl.stop()
    assert running and fake.raises == 0
    assert sum("re-scheduling tick failed" in r.getMessage() for r in caplog.records) == 3
    assert ctl.history[0].cause == "fail:d1"  # after three failed ticks, the next one handled the death


# ---- a dead worker comes back ----------------------------------------------------------------------------
class InProcessLauncher:
    """Worker servers in this event loop, restartable (the supervisor calls `restart` from a thread)."""

    def __init__(self, plan: Plan, secret: str, loop: asyncio.AbstractEventLoop, step_delay_s: float = 0.01) -> None:
        self.plan, self.secret, self.loop, self.step_delay_s = plan, secret, loop, step_delay_s
        self.servers: dict[str, WorkerServer] = {}
        self.engines: dict[str, FakeEngine] = {}
        self.exited: dict[str, int] = {}

    async def start_group(self, gid: str) -> WorkerEndpoint:
        cfg = WorkerConfig(group_id=gid, role=self.plan.group(gid).phase, heartbeat_interval_s=0.05,
                           kv_timeout_s=5.0)
        self.engines[gid] = FakeEngine(step_delay_s=self.step_delay_s)
        self.servers[gid] = WorkerServer(self.engines[gid], cfg, RawKvCodec(), secret=self.secret,
                                         pid=1000 + len(self.servers) + sum(1 for _ in self.exited))
        control, kv = await self.servers[gid].start()
        return WorkerEndpoint(gid, "127.0.0.1", control, kv, self.servers[gid].pid, 1)

    async def crash(self, gid: str) -> None:
        await self.servers[gid].stop()
        self.exited[gid] = -9

    def reap(self) -> dict[str, int]:
        out, self.exited = self.exited, {}
        return out

    def is_running(self, group_id: str) -> bool:
        return not self.servers[group_id]._stop_started

    def kill(self, group_id: str) -> None:
        asyncio.run_coroutine_threadsafe(self.crash(group_id), self.loop)

    def restart(self, group_id: str) -> WorkerEndpoint:
        return asyncio.run_coroutine_threadsafe(self.start_group(group_id), self.loop).result(30)


async def _until(cond: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _health(router: Router) -> dict[str, str]:
    return {w["group_id"]: w["health"] for w in AdminState(router).workers()}


@contextlib.asynccontextmanager
async def supervised(step_delay_s: float = 0.01) -> AsyncIterator[tuple[Router, InProcessLauncher]]:
    """p0 -> d0 with a deployment secret, a router and a supervisor (1 s first back-off)."""
    plan, secret = pd_plan(), new_secret()
    launcher = InProcessLauncher(plan, secret, asyncio.get_running_loop(), step_delay_s)
    endpoints = {g.id: await launcher.start_group(g.id) for g in plan.groups}
    router = Router(plan, {g: (e.host, e.control_port) for g, e in endpoints.items()},
                    RouterConfig(heartbeat_timeout_s=5.0, monitor_interval_s=0.05, max_retries=3), secret=secret)
    router.supervise(["d0", "p0"])
    sup = Supervisor(launcher, router, ["d0", "p0"], RestartPolicy(initial_backoff_s=1.0), interval_s=0.02)
    await router.start()
    sup.start()
    try:
        yield router, launcher
    finally:
        await sup.stop()
        await router.close()
        for s in launcher.servers.values():
            await s.stop()


async def test_a_killed_worker_is_restarted_readmitted_and_serves_again() -> None:
    async with supervised() as (router, launcher):
        plan, old = router.plan, launcher.engines["d0"]
        handles = [await router.submit(request(f"k{i}", max_tokens=60)) for i in range(4)]
        await _until(lambda: launcher.servers["d0"].core.state(0).running_decode == 4, "decoding on d0")
        await launcher.crash("d0")  # kill -9, as far as the router and the supervisor can tell
        await _until(lambda: _health(router)["d0"] == "restarting", "d0 shown restarting")
        assert RouterActuator(router).state().group("d0").alive  # type: ignore[union-attr]  # no re-plan meanwhile
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 60)
        for i, out in enumerate(outs):  # none lost, same tokens as without the kill
            assert out.token_ids == old.greedy(list(f"k{i}".encode()), 60)
        await _until(lambda: _health(router)["d0"] == "ok", "d0 re-admitted")
        d0 = next(w for w in router.workers() if w.group_id == "d0")
        assert d0.restarts == 1 and d0.role == "decode" and d0.weights_loads == 2 and launcher.engines["d0"] is not old
        assert router.plan == plan  # same groups, same routing
        again = await run_request(router, request("back", max_tokens=12))
        assert isinstance(again.terminal, Finished) and again.token_ids == old.greedy(list(b"back"), 12)
        assert launcher.engines["d0"].decode_calls  # the restarted worker decoded it (p0 shipped its KV there)


async def test_requests_at_the_only_entry_worker_wait_for_its_restart(caplog: pytest.LogCaptureFixture) -> None:
    async with supervised(step_delay_s=0.2) as (router, launcher):
        old = launcher.engines["p0"]
        with caplog.at_level(logging.WARNING, logger="thunderserve.router"):
            handles = [await router.submit(request(f"e{i}", max_tokens=5)) for i in range(3)]
            await _until(lambda: bool(old.prefill_calls), "prefill under way on p0")
            await launcher.crash("p0")  # the only entry worker dies with all three requests
            await _until(lambda: _health(router)["p0"] == "restarting", "p0 shown restarting")
            refused = await run_request(router, request("new", max_tokens=5))  # not accepted: told to come back
            outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 60)
        assert isinstance(refused.terminal, Failed) and refused.terminal.code == "no_worker"
        assert refused.terminal.retry_after_s is not None
        for i, out in enumerate(outs):  # accepted ones waited for p0's restart instead of failing
            assert isinstance(out.terminal, Finished), out.terminal
            assert out.token_ids == old.greedy(list(f"e{i}".encode()), 5)
        assert any("waiting for an entry worker to come back" in r.getMessage() for r in caplog.records)
        assert next(w for w in router.workers() if w.group_id == "p0").restarts == 1


async def test_a_late_worker_is_readmitted_when_it_answers_again() -> None:
    config = RouterConfig(heartbeat_timeout_s=0.3, monitor_interval_s=0.05, max_retries=3, late_grace_s=600.0)
    async with fake_deployment(pd_plan(), router_config=config, engine_kwargs={"step_delay_s": 0.01}) as dep:
        d0 = dep.servers["d0"]
        handles = [await dep.router.submit(request(f"l{i}", max_tokens=40)) for i in range(3)]
        await _until(lambda: d0.core.state(0).running_decode == 3, "decoding on d0")
        for task in d0._tasks[1:]:  # flush and heartbeat: d0 goes silent (starved, as far as anyone can tell)
            task.cancel()
        await _until(lambda: _health(dep.router)["d0"] == "late", "d0 late")
        assert RouterActuator(dep.router).state().group("d0").alive  # type: ignore[union-attr]  # not a failure
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 30)
        for i, out in enumerate(outs):
            assert out.token_ids == dep.engines["p0"].greedy(list(f"l{i}".encode()), 40)
        decoded = len(dep.engines["d0"].decode_calls)
        d0._tasks[1:] = [asyncio.create_task(d0._flush_loop()), asyncio.create_task(d0._heartbeat_loop())]
        await _until(lambda: _health(dep.router)["d0"] == "ok", "d0 back in")
        assert not d0._stopped.is_set()
        out = await run_request(dep.router, request("again", max_tokens=10))
        assert isinstance(out.terminal, Finished) and out.token_ids == dep.engines["p0"].greedy(list(b"again"), 10)
        assert len(dep.engines["d0"].decode_calls) > decoded  # routed to d0 again
        w = next(w for w in dep.router.workers() if w.group_id == "d0")
        assert w.restarts == 0 and w.weights_loads == 1 and w.down_reason == ""
