"""Supervision decisions (back-off, giving up, forgiving after a stable run) and the supervisor's driver over an
in-memory launcher and router (time passed in: no processes, no sleeping)."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field

import pytest

from thunderserve.runtime.launch.base import LaunchError, WorkerEndpoint
from thunderserve.runtime.launch.supervisor import GroupRestarts, RestartPolicy, Supervisor


# ---- pure decisions -------------------------------------------------------------------------------------
def test_backoff_doubles_from_one_second_up_to_the_cap() -> None:
    policy = RestartPolicy()
    assert [policy.backoff_s(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert RestartPolicy(initial_backoff_s=0.5, backoff_factor=3, max_backoff_s=5).backoff_s(3) == 4.5


@pytest.mark.parametrize("kw", [{"initial_backoff_s": -1}, {"backoff_factor": 0.5}, {"max_failures": 0},
                                {"initial_backoff_s": 10, "max_backoff_s": 5}])
def test_a_policy_that_makes_no_sense_is_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**kw)  # type: ignore[arg-type]


def test_consecutive_failures_back_off_then_give_up() -> None:
    policy = RestartPolicy(max_failures=3)
    state = GroupRestarts(up_since_s=0.0)
    assert state.died(policy, 10.0) == 11.0 and not state.due(10.5) and state.due(11.0)
    assert state.died(policy, 11.5) == 13.5  # the restart failed: 2 s
    assert state.died(policy, 14.0) == 18.0  # 4 s
    assert state.died(policy, 18.0) is None and state.gave_up and state.restart_at_s is None
    assert state.died(policy, 20.0) is None and state.failures == 4  # stays given up


def test_a_worker_that_stayed_up_long_enough_starts_from_one_second_again() -> None:
    policy = RestartPolicy(stable_s=60.0)
    state = GroupRestarts(up_since_s=0.0)
    state.died(policy, 5.0)
    state.started(6.0)
    assert state.died(policy, 10.0) == 12.0  # died again 4 s after its restart: second failure in a row
    state.started(12.5)
    assert state.died(policy, 12.5 + 60.0) == 12.5 + 61.0 and state.failures == 1  # stable for 60 s: forgiven
    assert state.restarts == 2


# ---- the driver over in-memory seams ----------------------------------------------------------------------
@dataclass
class FakeLauncher:
    running: dict[str, bool] = field(default_factory=dict)
    exited: dict[str, int] = field(default_factory=dict)  # reported by the next reap
    fail_starts: int = 0  # this many restarts fail
    restarted: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    next_pid: int = 100

    def reap(self) -> dict[str, int]:
        out, self.exited = self.exited, {}
        return out

    def is_running(self, group_id: str) -> bool:
        return self.running.get(group_id, False)

    def kill(self, group_id: str) -> None:
        self.killed.append(group_id)
        if self.running.get(group_id):
            self.running[group_id] = False
            self.exited[group_id] = -9

    def restart(self, group_id: str) -> WorkerEndpoint:
        self.restarted.append(group_id)
        if self.fail_starts:
            self.fail_starts -= 1
            raise LaunchError(f"worker {group_id} exited with code 1 before it was ready")
        self.running[group_id] = True
        self.next_pid += 1
        return WorkerEndpoint(group_id, "127.0.0.1", 7000 + self.next_pid, 8000, self.next_pid, 1)


@dataclass
class FakeRouter:
    groups: set[str]
    lost: set[str] = field(default_factory=set)
    readmitted: list[tuple[str, int]] = field(default_factory=list)
    given_up: dict[str, str] = field(default_factory=dict)
    refuse: int = 0  # this many readmits fail to connect

    def in_plan(self, group_id: str) -> bool:
        return group_id in self.groups

    def lost_groups(self) -> list[str]:
        return sorted(self.lost & self.groups)

    async def readmit(self, group_id: str, host: str, control_port: int) -> None:
        if self.refuse:
            self.refuse -= 1
            raise ConnectionError("connection refused")
        self.readmitted.append((group_id, control_port))
        self.lost.discard(group_id)

    def give_up(self, group_id: str, reason: str) -> None:
        self.given_up[group_id] = reason
        self.lost.discard(group_id)


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _supervisor(policy: RestartPolicy = RestartPolicy()) -> tuple[Supervisor, FakeLauncher, FakeRouter, Clock]:
    clock = Clock()
    launcher = FakeLauncher(running={"p0": True, "d0": True})
    router = FakeRouter({"p0", "d0"})
    return Supervisor(launcher, router, ["d0", "p0"], policy, clock=clock), launcher, router, clock


def _die(launcher: FakeLauncher, router: FakeRouter, gid: str, code: int = -9) -> None:
    launcher.running[gid] = False
    launcher.exited[gid] = code
    router.lost.add(gid)


def _at(sup: Supervisor, clock: Clock, now_s: float) -> None:
    async def tick() -> None:
        await sup.tick()
        await sup.settle()

    clock.now_s = now_s
    asyncio.run(tick())


def test_a_dead_worker_is_restarted_after_its_backoff_and_readmitted() -> None:
    sup, launcher, router, clock = _supervisor()
    _die(launcher, router, "d0")
    _at(sup, clock, 10.0)
    assert launcher.restarted == [] and sup.groups["d0"].restart_at_s == 11.0
    _at(sup, clock, 10.5)
    assert launcher.restarted == []  # still backing off
    _at(sup, clock, 11.0)
    assert launcher.restarted == ["d0"] and router.readmitted == [("d0", 7101)] and router.lost == set()
    assert sup.groups["d0"].restarts == 1 and sup.groups["d0"].failures == 1
    assert sup.groups["p0"].restarts == 0 and launcher.killed == []


def test_failed_starts_back_off_then_supervision_gives_up_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    sup, launcher, router, clock = _supervisor(RestartPolicy(max_failures=3))
    launcher.fail_starts = 10
    _die(launcher, router, "d0", code=1)
    with caplog.at_level(logging.WARNING, logger="thunderserve.supervisor"):
        for now in (0.0, 1.0, 3.0, 7.0, 20.0, 60.0):
            _at(sup, clock, now)
    assert launcher.restarted == ["d0", "d0", "d0"]  # at 1 s, then 2 s and 4 s after each failed start
    assert "gave up after 3 consecutive failures" in router.given_up["d0"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "re-plans without it" in errors[0].getMessage() and errors[0].exc_info is None


def test_a_readmit_that_fails_kills_the_new_process_and_counts_once() -> None:
    sup, launcher, router, clock = _supervisor()
    router.refuse = 1
    _die(launcher, router, "d0")
    _at(sup, clock, 0.0)
    _at(sup, clock, 1.0)  # restarted, could not be reached: killed, failure 2 -> retry in 2 s
    assert launcher.killed == ["d0"] and sup.groups["d0"].failures == 2 and sup.groups["d0"].restart_at_s == 3.0
    _at(sup, clock, 1.5)  # the killed process is reaped: not a third failure
    assert sup.groups["d0"].failures == 2 and sup.groups["d0"].restart_at_s == 3.0
    _at(sup, clock, 3.0)
    assert router.readmitted == [("d0", 7102)] and sup.groups["d0"].restarts == 1


def test_a_worker_lost_while_its_process_runs_is_killed_then_restarted() -> None:
    sup, launcher, router, clock = _supervisor(RestartPolicy(kill_after_s=5.0))
    router.lost.add("p0")  # the router lost its link (say, fenced after a hang) but the process lives on
    _at(sup, clock, 0.0)
    _at(sup, clock, 4.0)
    assert launcher.killed == []
    _at(sup, clock, 5.0)
    assert launcher.killed == ["p0"]
    _at(sup, clock, 5.5)  # reaped: restart scheduled
    _at(sup, clock, 6.5)
    assert router.readmitted == [("p0", 7101)]


def test_a_group_removed_from_the_plan_is_not_restarted() -> None:
    sup, launcher, router, clock = _supervisor()
    router.groups.discard("d0")  # re-scheduling dropped it
    _die(launcher, router, "d0")
    _at(sup, clock, 0.0)
    _at(sup, clock, 5.0)
    assert launcher.restarted == [] and router.readmitted == []


def test_two_dead_workers_load_at_the_same_time() -> None:
    sup, launcher, router, clock = _supervisor()
    barrier = threading.Barrier(2, timeout=10)  # passes only if both restarts are under way together
    plain = launcher.restart

    def restart(group_id: str) -> WorkerEndpoint:
        barrier.wait()
        return plain(group_id)

    launcher.restart = restart  # type: ignore[method-assign]
    _die(launcher, router, "d0")
    _die(launcher, router, "p0")
    _at(sup, clock, 0.0)
    _at(sup, clock, 1.0)
    assert sorted(g for g, _ in router.readmitted) == ["d0", "p0"] and not barrier.broken
