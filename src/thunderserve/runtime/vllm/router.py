"""The router over vLLM groups: same surface as `runtime.router.Router`, groups reached through `GroupClient`s.

Request lifecycle (one asyncio task per request, `_run`):
    arrive -> tokenize (at the chosen entry group) -> `Accepted`
    -> prefill on an entry group P (prefill role, by the entry shares): max_tokens 1, do_remote_decode
    -> decode on a decode group D (by P's KV shares), streaming, with the kv_transfer_params P returned;
       a colocated entry group, or no live decode group, generates itself (no KV moves)
    -> `Delta`s as tokens arrive -> exactly one `Finished` or `Failed`.
Every vLLM instance is `kv_both`, so a phase flip only changes which groups this router picks.

Exactly once: tokens reach the client only from here, in order, each once. When an instance fails mid-way
(`InstanceDown`: connection refused or dropped, a 5xx, or its health checks fail), the group leaves the
routing and the request is retried (up to `max_retries`) from the output already delivered: prompt + those
tokens are prefilled again (the lost KV is recomputed) on a live entry group, and decoding continues there or
on a live decode group. Greedy output continues as if nothing happened; seeded sampling continues validly but
not with the same random draws. An instance's 4xx reaches the client as that OpenAI error.

Instance liveness, as the router sees it (`WorkerInfo`):
    alive       answers: routed to
    restarting  down (a failed call confirmed by /health, or /health failed `health_failures` times), and its
                group is supervised (`launch.supervisor`, the same driver as the built-in engine's): back in as
                soon as its /health answers again (it was only slow); else the supervisor kills it if it still
                runs and starts the same instance spec again, which `readmit` checks (/health) and routes to
                again in the group's current role; `give_up` makes it dead
    dead        not coming back: re-scheduling re-plans without it
A request that finds no live entry group while one is restarting waits for it instead of failing (a new
request gets 503 with Retry-After meanwhile); it fails once none is expected back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from thunderserve.plan.model import Phase, Plan, Routing
from thunderserve.policy.routing import WeightedChooser
from thunderserve.resched.monitor import InFlight
from thunderserve.runtime.router_records import (
    Accepted,
    Delta,
    Failed,
    Finished,
    RequestHandle,
    RequestRecord,
    RouterEvent,
    WorkerInfo,
)
from thunderserve.runtime.vllm.client import GroupClient, InstanceDown, InstanceRejected, Sampling
from thunderserve.runtime.workers.protocol import GenerateRequest

log = logging.getLogger("thunderserve.vllm.router")


@dataclass(frozen=True)
class VllmRouterConfig:
    max_retries: int = 3  # re-submissions of a request whose instance failed (0: fail it at once)
    max_pending_requests: int = 10_000  # beyond this, new requests get 503 (overload)
    health_interval_s: float = 1.0  # how often every instance's /health is polled
    health_failures: int = 3  # consecutive failed polls that declare an instance down
    metrics_interval_s: float = 5.0  # how often instances' /metrics are scraped for our /metrics
    max_context_tokens: int = 0  # the model's context (0: unknown)
    retry_after_s: float = 1.0  # the Retry-After of a 503 while an entry instance is being restarted


@dataclass
class _Group:
    group_id: str
    client: GroupClient
    role: Phase
    pid: int = 0
    host: str = ""
    port: int = 0
    alive: bool = True
    in_plan: bool = True
    down_reason: str = ""
    failed_polls: int = 0
    last_ok_s: float = 0.0
    metrics_text: str = ""
    restarting: bool = False  # down, and supervision is bringing a new instance back (see `launch.supervisor`)
    restarts: int = 0  # times its instance was restarted and re-admitted


@dataclass
class _Track:
    handle: RequestHandle
    request: GenerateRequest
    arrival_s: float
    entry_group: str = ""
    prompt_ids: list[int] = field(default_factory=list)
    delivered_ids: list[int] = field(default_factory=list)
    locations: set[str] = field(default_factory=set)
    first_token_s: float | None = None
    retries: int = 0
    task: asyncio.Task[None] | None = None
    step: asyncio.Task[Any] | None = None


class _Lost(Exception):
    """The current attempt is lost at `group` (retry it elsewhere)."""

    def __init__(self, group: str, reason: str) -> None:
        super().__init__(reason)
        self.group = group
        self.reason = reason


class VllmRouter:
    """Routes requests over the vLLM instances of `plan`'s groups (`clients[group]`)."""

    def __init__(self, plan: Plan, clients: Mapping[str, GroupClient], config: VllmRouterConfig = VllmRouterConfig(),
                 clock: Callable[[], float] = time.monotonic, pids: Mapping[str, int] | None = None,
                 on_remove: Callable[[str], None] | None = None,
                 addresses: Mapping[str, tuple[str, int]] | None = None,
                 connect: Callable[[str, int], GroupClient] | None = None,
                 pid_of: Callable[[str], int] | None = None) -> None:
        """`connect(host, port)` makes the client of a restarted instance (None: the group's client is reused,
        the restart listens where the old one did); `pid_of(group)` is its instance's process id now (restarts
        change it; None: `pids` as given)."""
        if plan.routing is None:
            raise ValueError("plan has no routing")
        self.plan = plan
        self.config = config
        self.clock = clock
        where = addresses or {}
        self._groups = {g.id: _Group(g.id, clients[g.id], g.phase, (pids or {}).get(g.id, 0),
                                     *where.get(g.id, ("", 0))) for g in sorted(plan.groups, key=lambda g: g.id)}
        self.steps: dict[tuple[str, str], int] = {}  # (group, "prefill" | "decode" | "generate") -> calls made
        self._entry = WeightedChooser(plan.routing.entry)
        self._kv = {src: WeightedChooser(d) for src, d in plan.routing.kv.items()}
        self._requests: dict[str, _Track] = {}
        self._observers: list[Callable[[RequestRecord], None]] = []
        self._on_remove = on_remove
        self._connect = connect
        self._pid_of = pid_of
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._supervised: set[str] = set()  # groups whose dead instances are restarted (see `supervise`)
        self._changed = asyncio.Event()  # set (and replaced) whenever a group comes back or leaves for good
        self.retries_total = 0
        self.moved_total = 0

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        now = self.clock()
        for g in self._groups.values():
            g.last_ok_s = now
        self._tasks = [asyncio.create_task(self._health_loop(), name="vllm-health"),
                       asyncio.create_task(self._metrics_loop(), name="vllm-metrics")]

    async def close(self, shutdown_workers: bool = False) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        self._notify()
        for track in list(self._requests.values()):
            self._terminal(track, Failed(503, "server is shutting down", code="shutting_down"), "failed")
            if track.task is not None:
                track.task.cancel()
        for g in self._groups.values():
            await g.client.aclose()

    def add_observer(self, fn: Callable[[RequestRecord], None]) -> None:
        self._observers.append(fn)

    # ---- requests -----------------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        return len(self._requests)

    @property
    def max_context_tokens(self) -> int:
        return self.config.max_context_tokens

    def entry_groups(self) -> list[str]:
        """Groups that can take a new request now (alive, routed to, not in the decode role)."""
        return [g for g in self._entry.shares if g in self._groups and self._groups[g].alive
                and self._groups[g].role is not Phase.DECODE]

    async def submit(self, req: GenerateRequest) -> RequestHandle:
        handle = RequestHandle(req.request_id)
        if self._closed:
            handle._put(Failed(503, "server is shutting down", code="shutting_down"))
        elif req.request_id in self._requests:
            handle._put(Failed(400, f"duplicate request id {req.request_id}", "invalid_request_error"))
        elif len(self._requests) >= self.config.max_pending_requests:
            handle._put(Failed(503, f"server overloaded ({len(self._requests)} requests pending)", code="overloaded"))
        elif not self.entry_groups():
            back = self.config.retry_after_s if self._entry_coming_back() else None
            handle._put(Failed(503, "no live worker can take requests", code="no_worker", retry_after_s=back))
        else:
            track = _Track(handle, req, self.clock())
            self._requests[req.request_id] = track
            track.task = asyncio.create_task(self._run(track), name=f"vllm-req-{req.request_id}")
        return handle

    async def cancel(self, request_id: str) -> None:
        """The client went away: stop its work (closing the instance's stream aborts it there)."""
        track = self._requests.get(request_id)
        if track is not None:
            self._terminal(track, None, "cancelled")
            if track.task is not None:
                track.task.cancel()

    async def _run(self, track: _Track) -> None:
        while not track.handle.done:
            try:
                await self._attempt(track)
                return
            except _Lost as lost:
                g = self._groups[lost.group]
                if g.alive and not await g.client.healthy():  # one failed call of a live instance is not enough
                    await self._mark_down(lost.group, lost.reason)
                if track.handle.done:
                    return
                if track.retries >= self.config.max_retries:
                    suffix = f" (gave up after {track.retries} retries)" if track.retries else ""
                    self._terminal(track, Failed(503, f"{lost.reason}{suffix}", code="worker_failed"), "failed")
                    return
                if not await self._wait_for_entry(track, lost.reason):
                    self._terminal(track, Failed(503, f"{lost.reason}; no live worker can take the request "
                                                      "over", code="worker_failed"), "failed")
                    return
                track.retries += 1
                self.retries_total += 1
                log.warning("request %s: %s; retry %d after %d delivered tokens", track.handle.request_id,
                            lost.reason, track.retries, len(track.delivered_ids))
            except InstanceRejected as rej:
                outcome = "failed" if track.retries else "rejected"
                self._terminal(track, Failed(rej.status if not track.retries else 503, rej.message,
                                             "invalid_request_error" if not track.retries else "server_error",
                                             rej.param, rej.code), outcome)
                return
            except LookupError:  # no live entry group (before anything was sent): wait for one, or fail
                if not await self._wait_for_entry(track, "no live entry worker"):
                    self._terminal(track, Failed(503, "no live worker can take requests", code="no_worker"),
                                   "failed")
                    return

    async def _attempt(self, track: _Track) -> None:
        """One try: tokenize (first time), prefill on an entry group, decode on a decode group (or itself)."""
        entry = self._choose_entry()
        track.locations = {entry}
        if not track.entry_group:
            track.entry_group = entry
        req = track.request
        if not track.prompt_ids:
            track.prompt_ids = await self._step(track, entry, self._groups[entry].client.tokenize(req))
            max_tokens = self._max_tokens(track)
            if max_tokens < 1:
                raise InstanceRejected(400, f"prompt of {len(track.prompt_ids)} tokens leaves no room in the "
                                            f"context of {self.max_context_tokens} tokens", "messages",
                                       "context_length_exceeded")
            track.handle._put(Accepted(len(track.prompt_ids), max_tokens))
        remaining = self._max_tokens(track) - len(track.delivered_ids)
        prompt = track.prompt_ids + track.delivered_ids
        sampling = Sampling.of(req, remaining)
        decoder, kv_params = entry, None
        dest = self._choose_decode(entry)
        if dest is not None:
            self._count(entry, "prefill")
            kv_params = await self._step(track, entry, self._groups[entry].client.prefill(prompt, sampling))
            decoder = dest
            track.locations = {dest}
        self._count(decoder, "decode" if kv_params is not None else "generate")
        done = await self._step(track, decoder, self._stream(track, decoder, prompt, sampling, kv_params))
        if not done:
            raise _Lost(decoder, f"worker '{decoder}' ended a stream without finishing it")

    async def _stream(self, track: _Track, group: str, prompt: list[int], sampling: Sampling,
                      kv_params: dict[str, Any] | None) -> bool:
        """Deliver `group`'s generation as it streams (one task for the whole stream: HTTP streams must not
        change tasks midway); True once it finished the request."""
        stream = self._groups[group].client.generate(prompt, sampling, kv_params)
        try:
            async for chunk in stream:
                self._deliver(track, chunk.token_ids, chunk.text)
                if chunk.finish_reason:
                    self._terminal(track, Finished(str(chunk.finish_reason), len(track.prompt_ids),
                                                   len(track.delivered_ids)), "finished")
                    return True
            return False
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    def _count(self, group: str, step: str) -> None:
        self.steps[(group, step)] = self.steps.get((group, step), 0) + 1

    async def _step(self, track: _Track, group: str, aw: Any) -> Any:
        """Await one call to `group`'s instance; its failure (or the group going down meanwhile) is `_Lost`."""
        g = self._groups[group]
        if not g.alive:
            aw.close()
            raise _Lost(group, f"worker '{group}' is down: {g.down_reason}")
        task: asyncio.Task[Any] = asyncio.ensure_future(aw)
        track.step = task
        try:
            return await task
        except InstanceDown as exc:
            raise _Lost(group, f"worker '{group}' failed: {exc}") from None
        except asyncio.CancelledError:
            if not g.alive:  # cancelled by _mark_down, not by our caller
                raise _Lost(group, f"worker '{group}' is down: {g.down_reason}") from None
            raise
        finally:
            track.step = None

    def _deliver(self, track: _Track, ids: tuple[int, ...], text: str) -> None:
        if not ids and not text:
            return
        if track.first_token_s is None:
            track.first_token_s = self.clock()
        index = len(track.delivered_ids)
        track.delivered_ids.extend(ids)
        track.handle._put(Delta(text, ids, index))

    def _max_tokens(self, track: _Track) -> int:
        ctx = self.max_context_tokens
        room = ctx - len(track.prompt_ids) if ctx else 1 << 30
        asked = track.request.max_tokens
        return min(asked, room) if asked is not None else room

    def _choose_entry(self) -> str:
        live = set(self.entry_groups())
        return self._entry.choose(exclude=[g for g in self._entry.shares if g not in live])

    def _choose_decode(self, entry: str) -> str | None:
        """The decode group for KV from `entry` by its shares (live, decode role); None: decode at `entry`."""
        if self._groups[entry].role is Phase.COLOCATED or entry not in self._kv:
            return None
        chooser = self._kv[entry]
        live = [g for g in chooser.shares if g in self._groups and self._groups[g].alive
                and self._groups[g].role is Phase.DECODE]
        if not live:
            return None
        return chooser.choose(exclude=[g for g in chooser.shares if g not in live])

    # ---- failures -------------------------------------------------------------------------------------
    async def _mark_down(self, group_id: str, reason: str) -> None:
        """Declare an instance lost: it leaves routing, and attempts waiting on it are retried elsewhere."""
        g = self._groups.get(group_id)
        if g is None or not g.alive:
            return
        g.alive = False
        g.down_reason = reason
        g.restarting = g.in_plan and group_id in self._supervised and not self._closed
        if g.in_plan:
            log.error("worker %s is down: %s%s", group_id, reason, "; restarting it" if g.restarting else "")
        for t in list(self._requests.values()):
            if group_id in t.locations and t.step is not None and not t.step.done():
                t.step.cancel()  # `_step` sees the group down and turns this into `_Lost`

    def _notify(self) -> None:
        """Wake the requests waiting for an entry group (one came back, or one will not)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _entry_coming_back(self) -> bool:
        """An entry group of the routing is being restarted (expected back)."""
        return any(g in self._groups and self._groups[g].in_plan and self._groups[g].restarting
                   and self._groups[g].role is not Phase.DECODE for g in self._entry.shares)

    async def _wait_for_entry(self, track: _Track, reason: str) -> bool:
        """Wait while no entry group is live but one is being restarted; True once one is live, False when
        none is expected back (or the request ended meanwhile)."""
        logged = False
        track.locations = set()  # held nowhere while it waits
        while not self.entry_groups():
            if track.handle.done or self._closed or not self._entry_coming_back():
                return False
            if not logged:
                log.warning("request %s: %s; waiting for an entry worker to come back", track.handle.request_id,
                            reason)
                logged = True
            await self._changed.wait()
        return not track.handle.done

    # ---- supervision (launch.supervisor.SupervisedRouter) -------------------------------------------------
    def supervise(self, groups: list[str]) -> None:
        """Dead instances of these groups are restarted by a supervisor: they show "restarting", not dead."""
        self._supervised = set(groups)

    def in_plan(self, group_id: str) -> bool:
        g = self._groups.get(group_id)
        return g is not None and g.in_plan

    def lost_groups(self) -> list[str]:
        """Groups of the plan whose instance is down and being restarted."""
        return sorted(gid for gid, g in self._groups.items() if g.restarting and g.in_plan and not g.alive)

    def give_up(self, group_id: str, reason: str) -> None:
        """Supervision gave up on the group's instance: it is dead (the controller re-plans without it)."""
        g = self._groups.get(group_id)
        if g is not None and not g.alive:
            g.restarting, g.down_reason = False, reason
        self._notify()

    async def readmit(self, group_id: str, host: str, control_port: int) -> None:
        """A restarted instance of `group_id` serves at host:control_port (its HTTP port): check its /health,
        then route to it again in the group's current role. LookupError when the group is no longer in the
        plan; InstanceDown when the instance does not answer."""
        g = self._groups.get(group_id)
        if self._closed or g is None or not g.in_plan:
            raise LookupError(f"group '{group_id}' is not in the plan")
        client = self._connect(host, control_port) if self._connect is not None else g.client
        if not await client.healthy():
            if client is not g.client:
                await client.aclose()
            raise InstanceDown(f"restarted instance of group '{group_id}' at {host}:{control_port} does not "
                               "answer /health")
        if self._closed or not g.in_plan:  # removed while we checked
            if client is not g.client:
                await client.aclose()
            raise LookupError(f"group '{group_id}' is not in the plan")
        if g.alive and (g.host, g.port) != (host, control_port):  # the old one, elsewhere, not noticed dead yet:
            await self._mark_down(group_id, "replaced by a restarted instance")  # retry what it held first
        old, g.client = g.client, client
        if old is not client:
            with contextlib.suppress(Exception):
                await old.aclose()
        g.host, g.port = host, control_port
        g.alive, g.restarting, g.down_reason = True, False, ""
        g.failed_polls, g.last_ok_s, g.metrics_text = 0, self.clock(), ""
        g.restarts += 1
        log.warning("worker %s re-admitted as %s (restart %d)", group_id, g.role, g.restarts)
        self._notify()

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            for g in list(self._groups.values()):
                if not g.alive:
                    if g.restarting and g.in_plan and await g.client.healthy():
                        self._answered_again(g)
                    continue
                if await g.client.healthy():
                    g.failed_polls = 0
                    g.last_ok_s = self.clock()
                else:
                    g.failed_polls += 1
                    if g.failed_polls >= self.config.health_failures:
                        await self._mark_down(g.group_id, f"down: /health failed {g.failed_polls} times in a row")

    def _answered_again(self, g: _Group) -> None:
        """A restarting group's instance answers /health again (it was only slow, or its restart is up): route
        to it again (the supervisor kills a lost instance that stays silent, see `launch.supervisor`)."""
        if g.alive or not g.in_plan:
            return
        log.warning("worker %s answers /health again; re-admitted", g.group_id)
        g.alive, g.restarting, g.down_reason = True, False, ""
        g.failed_polls, g.last_ok_s = 0, self.clock()
        self._notify()

    async def _metrics_loop(self) -> None:
        while True:
            for g in list(self._groups.values()):
                if g.alive:
                    with contextlib.suppress(InstanceDown):
                        g.metrics_text = await g.client.metrics_text()
            await asyncio.sleep(self.config.metrics_interval_s)

    def instance_metrics(self) -> dict[str, str]:
        """The latest Prometheus text scraped from each live instance, by group."""
        return {gid: g.metrics_text for gid, g in sorted(self._groups.items()) if g.alive and g.metrics_text}

    # ---- control (AdminState and the re-scheduling actuator use these) ---------------------------------
    async def set_role(self, group_id: str, role: Phase | str) -> None:
        """Flip a group's phase: routing only (every instance is kv_both; nothing restarts or reloads)."""
        phase = Phase(role)
        self._groups[group_id].role = phase
        self.plan = self.plan.model_copy(update={"groups": tuple(
            g.with_phase(phase) if g.id == group_id else g for g in self.plan.groups)})
        self._notify()

    async def update_routing(self, routing: Routing, rebalance: bool = False) -> None:
        """New entry and KV shares for new requests (requests in flight finish where they run)."""
        self._entry.update(routing.entry)
        self._kv = {src: WeightedChooser(d) for src, d in routing.kv.items()}
        self.plan = self.plan.model_copy(update={"routing": routing})
        self._notify()

    async def remove_group(self, group_id: str, drain_timeout_s: float = 0.0) -> None:
        """Take a group out: drain (up to `drain_timeout_s`), stop its instance; what it still holds is retried."""
        g = self._groups.get(group_id)
        if g is None or not g.in_plan:
            return
        if len(self.plan.groups) == 1 and self.plan.groups[0].id == group_id:
            raise ValueError(f"cannot remove group '{group_id}': it is the last group of the plan")
        deadline = self.clock() + drain_timeout_s
        while g.alive and any(group_id in t.locations for t in self._requests.values()) and self.clock() < deadline:
            await asyncio.sleep(0.05)
        g.in_plan = False
        await self._mark_down(group_id, "removed from the plan by re-scheduling")
        if self._on_remove is not None:
            await asyncio.to_thread(self._on_remove, group_id)
        self._entry.update({k: v for k, v in self._entry.shares.items() if k != group_id})
        routing = self.plan.routing or Routing()
        kept = Routing(entry={k: v for k, v in routing.entry.items() if k != group_id},
                       kv={src: {d: v for d, v in dests.items() if d != group_id}
                           for src, dests in routing.kv.items() if src != group_id})
        self._kv = {src: WeightedChooser(d) for src, d in kept.kv.items()}
        self.plan = self.plan.model_copy(update={
            "groups": tuple(x for x in self.plan.groups if x.id != group_id), "routing": kept})
        self._notify()

    def set_estimate(self, estimate: Mapping[str, Any]) -> None:
        self.plan = self.plan.model_copy(update={"estimate": dict(estimate)})

    def in_flight(self) -> dict[str, InFlight]:
        return {rid: InFlight(t.arrival_s, len(t.prompt_ids), len(t.delivered_ids))
                for rid, t in self._requests.items() if t.prompt_ids}

    def workers(self) -> list[WorkerInfo]:
        now = self.clock()
        held: dict[str, int] = {}
        for t in self._requests.values():
            for gid in t.locations:
                held[gid] = held.get(gid, 0) + 1
        return [WorkerInfo(gid, str(g.role), g.alive, self._pid_of(gid) if self._pid_of is not None else g.pid,
                           g.host, g.port, 0, 0, self.max_context_tokens, g.down_reason, now - g.last_ok_s, None,
                           g.in_plan, 1 + g.restarts, held.get(gid, 0), restarting=g.restarting,
                           restarts=g.restarts)
                for gid, g in sorted(self._groups.items())]

    # ---- terminal -------------------------------------------------------------------------------------
    def _terminal(self, track: _Track, event: RouterEvent | None, outcome: str) -> None:
        if track.handle.done:
            return
        track.handle.done = True
        self._requests.pop(track.handle.request_id, None)
        if event is not None:
            track.handle._put(event)
        record = RequestRecord(track.handle.request_id, track.entry_group, outcome, track.arrival_s,
                               track.first_token_s, self.clock(), len(track.prompt_ids), len(track.delivered_ids),
                               track.retries)
        for fn in self._observers:
            try:
                fn(record)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("request observer failed")
