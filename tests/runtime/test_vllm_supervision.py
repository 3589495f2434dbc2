"""vLLM-engine supervision: the built-in engine's `Supervisor` over `VllmRouter` (fake group clients) and an
in-memory instance launcher. A dead instance is restarted after its back-off (time passed in), re-admitted
in its role and serves again; an accepted request waits for it and loses no token; after `max_failures` the
group is given up and the controller's view shows it dead; an instance that was only slow gets back in.
(Real processes: tests/runtime/test_vllm_launcher.py.)"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from test_vllm_router import collect, expected, make_plan, request

from thunderserve.plan.model import Group, Phase, Plan, Routing, Stage
from thunderserve.resched.actuator import RouterActuator
from thunderserve.runtime.launch.base import LaunchError, WorkerEndpoint
from thunderserve.runtime.launch.supervisor import RestartPolicy, Supervisor, supervisor_for
from thunderserve.runtime.router import Delta, Failed, Finished
from thunderserve.runtime.vllm.client import GroupClient
from thunderserve.runtime.vllm.fake import FakeGroupClient
from thunderserve.runtime.vllm.router import VllmRouter, VllmRouterConfig

pytestmark = pytest.mark.anyio


@dataclass
class FakeInstances:
    """Instances as processes: one `FakeGroupClient` each; a dead client is an exited process unless its group
    is `hung` (the process runs on, silent). `restart` starts a new instance (a new client, a new pid, its
    group's own port), which the router's `connect` reaches."""

    clients: dict[str, FakeGroupClient]
    fail_starts: int = 0  # this many restarts fail (the instance exits before it is ready)
    hung: set[str] = field(default_factory=set)
    restarted: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    _reported: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.pids = {g: 100 + i for i, g in enumerate(sorted(self.clients))}
        self.ports = {g: 9000 + i for i, g in enumerate(sorted(self.clients))}

    def reap(self) -> dict[str, int]:
        dead = {g: -9 for g in sorted(self.clients) if not self.is_running(g) and g not in self._reported}
        self._reported |= set(dead)
        return dead

    def is_running(self, group_id: str) -> bool:
        return self.clients[group_id].alive or group_id in self.hung

    def kill(self, group_id: str) -> None:
        self.killed.append(group_id)
        self.hung.discard(group_id)
        self.clients[group_id].die()

    def restart(self, group_id: str) -> WorkerEndpoint:
        self.restarted.append(group_id)
        if self.fail_starts:
            self.fail_starts -= 1
            raise LaunchError(f"vLLM instance of group {group_id} exited with code 1 before it was ready")
        self.clients[group_id] = FakeGroupClient(group_id)
        self._reported.discard(group_id)
        self.pids[group_id] = max(self.pids.values()) + 1
        return WorkerEndpoint(group_id, "127.0.0.1", self.ports[group_id], 0, self.pids[group_id], 0)

    def connect(self, host: str, port: int) -> GroupClient:
        (gid,) = [g for g, p in self.ports.items() if p == port]
        return self.clients[gid]


def alive_for_controller(router: VllmRouter, group_id: str) -> bool:
    """Whether the re-scheduling controller counts the group alive (else it re-plans without it)."""
    state = RouterActuator(router).state().group(group_id)
    assert state is not None
    return state.alive


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def colocated_plan() -> Plan:
    return Plan(model="m", cluster="c", routing=Routing(entry={"c0": 1.0}),
                groups=(Group(id="c0", phase=Phase.COLOCATED, stages=(Stage(gpus=("n:0",), layers=(0, 2)),)),))


def supervised(plan: Plan, clients: dict[str, FakeGroupClient], policy: RestartPolicy = RestartPolicy(),
               ) -> tuple[VllmRouter, Supervisor, FakeInstances, Clock]:
    instances = FakeInstances(clients)
    cfg = VllmRouterConfig(health_interval_s=0.01, health_failures=1, metrics_interval_s=0.01, max_context_tokens=512)
    router = VllmRouter(plan, dict(clients), cfg, connect=instances.connect,  # type: ignore[arg-type]
                        pid_of=lambda g: instances.pids[g])
    clock = Clock()
    router.supervise(sorted(clients))  # as `supervisor_for` does; this supervisor gets a clock the test moves
    sup = Supervisor(instances, router, sorted(clients), policy, clock=clock)
    return router, sup, instances, clock


async def at(sup: Supervisor, clock: Clock, now_s: float) -> None:
    clock.now_s = now_s
    await sup.tick()
    await sup.settle()


async def until(cond: object, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 30
    while not cond():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_a_dead_decode_instance_is_restarted_after_its_backoff_and_decodes_again() -> None:
    p0, d0 = FakeGroupClient("p0"), FakeGroupClient("d0", die_after_tokens=3)
    router, sup, instances, clock = supervised(make_plan(), {"p0": p0, "d0": d0})
    await router.start()
    try:
        ids, events = await collect(router, request("a", max_tokens=10))
        assert ids == expected("hello", 10) and isinstance(events[-1], Finished)  # retried at p0: nothing lost
        d0_info = {w.group_id: w for w in router.workers()}["d0"]
        assert not d0_info.alive and d0_info.restarting and router.lost_groups() == ["d0"]
        assert alive_for_controller(router, "d0")  # the controller does not re-plan around it

        await at(sup, clock, 0.0)  # reaped: first failure, restart due in 1 s
        await at(sup, clock, 0.9)
        assert instances.restarted == []  # still backing off
        await at(sup, clock, 1.0)
        assert instances.restarted == ["d0"] and sup.groups["d0"].restarts == 1

        new_d0 = instances.clients["d0"]
        assert new_d0 is not d0
        info = {w.group_id: w for w in router.workers()}["d0"]
        assert info.alive and not info.restarting and info.restarts == 1 and info.role == "decode"
        assert info.pid == instances.pids["d0"] != 100
        ids, events = await collect(router, request("b", max_tokens=6))
        assert ids == expected("hello", 6) and isinstance(events[-1], Finished)
        assert new_d0.decodes_from_kv == 1  # decoded at the restarted instance, from p0's KV, as planned
    finally:
        await router.close()


async def test_an_accepted_request_waits_for_its_only_instance_to_come_back_and_loses_no_token() -> None:
    c0 = FakeGroupClient("c0", die_after_tokens=4, step_delay_s=0.001)
    router, sup, instances, clock = supervised(colocated_plan(), {"c0": c0})
    await router.start()
    try:
        handle = await router.submit(request("a", max_tokens=12))
        events: list[object] = []

        async def read() -> None:
            async for ev in handle:
                events.append(ev)

        reader = asyncio.create_task(read())
        await until(lambda: router.lost_groups() == ["c0"], "the instance to be lost")
        refused = await collect(router, request("new"))  # a new request meanwhile: 503 + Retry-After
        assert isinstance(refused[1][-1], Failed) and refused[1][-1].retry_after_s == 1.0
        assert not reader.done()  # the accepted one waits rather than fail
        await at(sup, clock, 0.0)
        await at(sup, clock, 1.0)  # restarted and re-admitted: the waiting request resumes there
        await asyncio.wait_for(reader, 30)
    finally:
        await router.close()
    ids = [t for ev in events if isinstance(ev, Delta) for t in ev.token_ids]
    assert ids == expected("hello", 12) and isinstance(events[-1], Finished)  # each token exactly once
    assert instances.clients["c0"].generated == 12 - 4  # the new instance continued after the 4 delivered


async def test_after_max_failures_the_group_is_given_up_and_waiting_requests_fail() -> None:
    c0 = FakeGroupClient("c0", die_after_tokens=2)
    policy = RestartPolicy(max_failures=2)
    router, sup, instances, clock = supervised(colocated_plan(), {"c0": c0}, policy)
    instances.fail_starts = 10
    await router.start()
    try:
        handle = await router.submit(request("a", max_tokens=8))
        await until(lambda: router.lost_groups() == ["c0"], "the instance to be lost")
        await at(sup, clock, 0.0)  # failure 1: restart in 1 s
        await at(sup, clock, 1.0)  # the restart fails: failure 2, next in 2 s
        assert instances.restarted == ["c0"] and router.lost_groups() == ["c0"]
        await at(sup, clock, 3.0)  # fails again: failure 3 > 2, given up
        assert instances.restarted == ["c0", "c0"] and sup.groups["c0"].gave_up
        events = [ev async for ev in handle]
    finally:
        await router.close()
    assert isinstance(events[-1], Failed) and events[-1].status == 503 and "c0" in events[-1].message
    info = router.workers()[0]
    assert not info.alive and not info.restarting and "gave up after 2 consecutive failures" in info.down_reason
    assert not alive_for_controller(router, "c0")  # the controller may re-plan without it


async def test_an_instance_that_was_only_slow_gets_back_in_without_a_restart() -> None:
    p0, d0 = FakeGroupClient("p0"), FakeGroupClient("d0")
    router, sup, instances, clock = supervised(make_plan(), {"p0": p0, "d0": d0})
    await router.start()
    try:
        d0.alive = False  # /health fails (a starved instance), its process runs on
        instances.hung.add("d0")
        await until(lambda: router.lost_groups() == ["d0"], "the instance to be declared down")
        await at(sup, clock, 0.0)  # lost while running: killed only after kill_after_s (5 s)
        d0.alive = True  # it answers again
        await until(lambda: router.lost_groups() == [], "the instance to be re-admitted")
        await at(sup, clock, 10.0)
        ids, _ = await collect(router, request("a", max_tokens=5))
    finally:
        await router.close()
    assert ids == expected("hello", 5) and d0.decodes_from_kv == 1
    assert instances.killed == [] and instances.restarted == []
    assert router.workers()[0].restarts == 0


async def test_a_silent_instance_whose_process_runs_is_killed_then_restarted() -> None:
    p0, d0 = FakeGroupClient("p0"), FakeGroupClient("d0")
    router, sup, instances, clock = supervised(make_plan(), {"p0": p0, "d0": d0})
    await router.start()
    try:
        d0.alive = False  # hung: /health fails, the process lives on
        instances.hung.add("d0")
        await until(lambda: router.lost_groups() == ["d0"], "the instance to be declared down")
        await at(sup, clock, 0.0)
        await at(sup, clock, 5.0)  # lost 5 s while running: killed
        assert instances.killed == ["d0"]
        await at(sup, clock, 5.0)  # its exit is reaped: restart due in 1 s
        await at(sup, clock, 6.0)
        assert instances.restarted == ["d0"] and router.lost_groups() == []
    finally:
        await router.close()


async def test_supervisor_only_with_restart_workers_and_a_launcher_that_can_restart() -> None:
    clients = {"p0": FakeGroupClient("p0"), "d0": FakeGroupClient("d0")}
    cfg = VllmRouterConfig(health_interval_s=0.01, health_failures=1, metrics_interval_s=0.01)
    router = VllmRouter(make_plan(), dict(clients), cfg)  # type: ignore[arg-type]
    instances = FakeInstances(clients)

    class ReapOnly:
        def reap(self) -> dict[str, int]:
            return {}

    assert supervisor_for(instances, router, ["p0", "d0"], enabled=False) is None
    assert supervisor_for(ReapOnly(), router, ["p0", "d0"]) is None
    await router.start()
    try:
        clients["d0"].die()
        await until(lambda: not router.workers()[0].alive, "d0 to be declared down")
        assert router.lost_groups() == [] and not router.workers()[0].restarting  # unsupervised: dead
        assert supervisor_for(instances, router, ["p0", "d0"]) is not None
        clients["p0"].die()
        await until(lambda: router.lost_groups() == ["p0"], "p0 to be restarting")  # supervised now
    finally:
        await router.close()
