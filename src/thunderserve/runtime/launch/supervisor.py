"""Supervision: reap dead worker processes, restart them with back-off, and re-admit them to the router.

Supervised worker lifecycle (one `GroupRestarts` per plan group; the plan itself never changes here):
    up          serving; `stable_s` of it after a (re)start forgives earlier failures
    dead        its process exited (kill -9, a crash, a fenced hang): the router has already retried its
                requests and shows it "restarting" (the controller does not re-plan around it meanwhile);
                a restart is scheduled `backoff_s(failures)` after the death (1, 2, 4, ... s, capped)
    restarting  a fresh process loads the same launch spec; once it reports ready the router connects to
                it (handshake with the deployment secret, `hello`, `configure` with its role, KV shares and
                peers) and routes to it again, for the same group and role: up again
    given up    after `max_failures` consecutive deaths or failed starts: one log line, the router shows it
                down, and the controller re-plans without its GPUs (as without supervision)
A worker the router lost while its process lives on (a link that broke, a hang fenced after the late grace)
is killed after `kill_after_s`, then restarted the same way.

`RestartPolicy` and `GroupRestarts` are the pure decisions (time passed in); `Supervisor` is the asyncio
driver over two seams: the launcher (`SupervisedLauncher`: reap, restart, kill) and the router
(`SupervisedRouter`: which groups are down, re-admit, give up). Both engines use it: built-in workers
(`launch.local.LocalLauncher` + `runtime.router.Router`) and vLLM instances (`vllm.launcher.VllmLocalLauncher`
+ `vllm.router.VllmRouter`); `supervisor_for` picks it when the launcher can restart, `reap_loop` only reaps.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

from thunderserve.runtime.launch.base import WorkerEndpoint

log = logging.getLogger("thunderserve.supervisor")


# ---- decisions (pure) -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a dead worker, and when to stop trying."""

    initial_backoff_s: float = 1.0  # wait before the first restart after a death
    backoff_factor: float = 2.0  # each further consecutive failure multiplies the wait
    max_backoff_s: float = 30.0  # cap on the wait
    max_failures: int = 5  # consecutive deaths or failed starts before giving up on the group
    stable_s: float = 60.0  # up this long after a (re)start: the failure count starts again from 0
    kill_after_s: float = 5.0  # a worker the router lost while its process lives is killed after this

    def __post_init__(self) -> None:
        if self.initial_backoff_s < 0 or self.backoff_factor < 1 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("back-off: need 0 <= initial <= max and factor >= 1")
        if self.max_failures < 1 or self.stable_s < 0 or self.kill_after_s < 0:
            raise ValueError("max_failures must be >= 1, stable_s and kill_after_s >= 0")

    def backoff_s(self, failures: int) -> float:
        """The wait before the restart that follows the `failures`-th consecutive failure (>= 1)."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.backoff_factor ** max(failures - 1, 0))


@dataclass
class GroupRestarts:
    """One group's supervision state; transitions take the time, so they are tested without processes."""

    up_since_s: float | None = 0.0  # when it last came up (None while dead)
    failures: int = 0  # consecutive failures (deaths, failed starts) since it was last stable
    restart_at_s: float | None = None  # when the next restart is due (None: none scheduled)
    restarts: int = 0  # successful restarts so far
    gave_up: bool = False

    def died(self, policy: RestartPolicy, now_s: float) -> float | None:
        """The worker died or a restart failed: when to try again, or None after giving up."""
        if self.gave_up:
            return None
        if self.up_since_s is not None and now_s - self.up_since_s >= policy.stable_s:
            self.failures = 0  # it had been healthy long enough: this is a fresh failure
        self.up_since_s = None
        self.failures += 1
        if self.failures > policy.max_failures:
            self.gave_up, self.restart_at_s = True, None
            return None
        self.restart_at_s = now_s + policy.backoff_s(self.failures)
        return self.restart_at_s

    def due(self, now_s: float) -> bool:
        return self.restart_at_s is not None and now_s >= self.restart_at_s

    def started(self, now_s: float) -> None:
        """A restarted worker is serving again."""
        self.up_since_s, self.restart_at_s = now_s, None
        self.restarts += 1


# ---- seams ---------------------------------------------------------------------------------------------
class SupervisedLauncher(Protocol):
    """What supervision needs from a launcher (the local one has it)."""

    def reap(self) -> dict[str, int]:
        """Workers that exited since the last call: {group: exit code} (collected: no zombies)."""
        ...

    def is_running(self, group_id: str) -> bool: ...

    def kill(self, group_id: str) -> None:
        """SIGKILL the group's worker (it is reaped by a later `reap`)."""
        ...

    def restart(self, group_id: str) -> WorkerEndpoint:
        """Start the group's worker again from its launch spec and wait until it is ready (blocking)."""
        ...


class SupervisedRouter(Protocol):
    """What supervision needs from the router."""

    def in_plan(self, group_id: str) -> bool:
        """The group is still part of the running plan (not removed by re-scheduling)."""
        ...

    def lost_groups(self) -> list[str]:
        """Groups of the plan whose worker is down and expected back (not removed, not given up)."""
        ...

    async def readmit(self, group_id: str, host: str, control_port: int) -> None:
        """Connect to the group's new worker and route to it again; LookupError if the group left the plan."""
        ...

    def give_up(self, group_id: str, reason: str) -> None:
        """The group's worker will not come back: show it down (the controller re-plans without it)."""
        ...


class SupervisableRouter(SupervisedRouter, Protocol):
    def supervise(self, groups: list[str]) -> None:
        """Dead workers of these groups will be restarted: show them "restarting", not dead."""
        ...


SUPERVISION_METHODS = ("reap", "is_running", "kill", "restart")


def supervisor_for(launcher: object, router: SupervisableRouter, groups: list[str],
                   enabled: bool = True) -> Supervisor | None:
    """The supervisor of `groups`' workers when `enabled` and the launcher can restart them (it has every method
    of `SupervisedLauncher`); None otherwise (`reap_loop` then only reaps the dead)."""
    if not enabled or not all(callable(getattr(launcher, m, None)) for m in SUPERVISION_METHODS):
        return None
    router.supervise(sorted(groups))
    return Supervisor(cast(SupervisedLauncher, launcher), router, sorted(groups))


async def reap_loop(launcher: object, interval_s: float = 1.0) -> None:
    """Without supervision: reap workers that exited (kill -9, a crash) so none stays a zombie; the router has
    already retried their requests and the controller re-plans without them."""
    reap = getattr(launcher, "reap", None)
    if reap is None:
        return
    while True:
        await asyncio.sleep(interval_s)
        for gid, code in reap().items():
            log.warning("worker %s exited with code %d; reaped", gid, code)


# ---- the driver ----------------------------------------------------------------------------------------
class Supervisor:
    """Reaps, restarts (with back-off) and re-admits the workers of `groups` (an asyncio task)."""

    def __init__(self, launcher: SupervisedLauncher, router: SupervisedRouter, groups: list[str],
                 policy: RestartPolicy = RestartPolicy(), *, interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.launcher = launcher
        self.router = router
        self.policy = policy
        self.interval_s = interval_s
        self.clock = clock
        now = clock()
        self.groups = {g: GroupRestarts(up_since_s=now) for g in sorted(groups)}
        self._lost_since: dict[str, float] = {}  # router lost it, process still running: since when
        self._counted: set[str] = set()  # killed by us after a failure already counted: ignore its exit
        self._task: asyncio.Task[None] | None = None
        self._restarts: dict[str, asyncio.Task[None]] = {}  # restarts under way (several load at once)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="worker-supervisor")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._restarts.values()) if t is not None]
        self._task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def settle(self) -> None:
        """Wait for the restarts under way (tests; `tick` itself does not wait for a worker to load)."""
        while self._restarts:
            await asyncio.gather(*self._restarts.values(), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - supervision must outlive one bad restart
                log.exception("supervision tick failed")
            await asyncio.sleep(self.interval_s)

    async def tick(self) -> None:
        """Reap exits and schedule restarts; kill workers lost while running; start the restarts due (each
        in its own task: a worker loading does not hold up the others)."""
        now = self.clock()
        for gid, code in self.launcher.reap().items():
            state = self.groups.get(gid)
            self._lost_since.pop(gid, None)
            if gid in self._counted or state is None or state.gave_up:
                self._counted.discard(gid)
                log.warning("worker %s exited with code %d; reaped", gid, code)
                continue
            if not self.router.in_plan(gid):  # removed by re-scheduling: nothing to restart
                log.warning("worker %s exited with code %d; reaped (not in the plan: not restarted)", gid, code)
                continue
            self._schedule(gid, state, now, f"exited with code {code}")
        lost = set(self.router.lost_groups())
        for gid in sorted(lost):
            state = self.groups.get(gid)
            if state is None or state.restart_at_s is not None or state.gave_up or gid in self._restarts:
                continue
            if self.launcher.is_running(gid):  # the link broke but the process lives (or hangs)
                since = self._lost_since.setdefault(gid, now)
                if now - since >= self.policy.kill_after_s:
                    log.warning("worker %s: lost by the router %.1f s ago while its process runs; killing it "
                                "to restart it", gid, now - since)
                    self.launcher.kill(gid)
        for gid in [g for g in self._lost_since if g not in lost]:
            del self._lost_since[gid]
        for gid, state in sorted(self.groups.items()):
            if state.due(now) and gid not in self._restarts:
                state.restart_at_s = None
                task = asyncio.create_task(self._restart(gid, state), name=f"restart-{gid}")
                self._restarts[gid] = task
                task.add_done_callback(functools.partial(self._restart_done, gid))

    def _schedule(self, gid: str, state: GroupRestarts, now: float, why: str) -> None:
        at = state.died(self.policy, now)
        if at is None:
            reason = (f"{why}; gave up after {state.failures - 1} consecutive failures (restarts so far: "
                      f"{state.restarts})")
            log.error("worker %s %s; the controller re-plans without it", gid, reason)
            self.router.give_up(gid, reason)
            return
        log.warning("worker %s %s; restart %d in %.1f s (failure %d of %d)", gid, why, state.restarts + 1,
                    at - now, state.failures, self.policy.max_failures)

    def _restart_done(self, gid: str, _: asyncio.Task[None]) -> None:
        self._restarts.pop(gid, None)

    def _kill_counted(self, gid: str) -> None:
        """Kill a worker whose failure is already accounted for (its exit must not count again)."""
        self._counted.add(gid)
        self.launcher.kill(gid)

    async def _restart(self, gid: str, state: GroupRestarts) -> None:
        if not self.router.in_plan(gid):
            log.warning("worker %s: left the plan before its restart; not restarted", gid)
            return
        try:
            endpoint = await asyncio.to_thread(self.launcher.restart, gid)
        except Exception as exc:  # noqa: BLE001 - a failed start counts as a failure, with back-off
            self._schedule(gid, state, self.clock(), f"failed to restart ({type(exc).__name__}: {exc})")
            return
        try:
            await self.router.readmit(gid, endpoint.host, endpoint.control_port)
        except LookupError:  # left the plan while it loaded
            log.warning("worker %s: left the plan while restarting; stopping the new process", gid)
            self._kill_counted(gid)
            return
        except Exception as exc:  # noqa: BLE001 - it could not be reached: kill it, count a failure
            self._kill_counted(gid)
            self._schedule(gid, state, self.clock(),
                           f"restarted but the router could not re-admit it ({type(exc).__name__}: {exc})")
            return
        state.started(self.clock())
        log.warning("worker %s restarted (pid %d) and re-admitted; restarts so far: %d", gid, endpoint.pid,
                    state.restarts)
