"""The router: entry routing, token streaming and request tracking over the workers of a plan.

It lives in the API server's event loop and holds one control connection per worker (group). For each
request it picks an entry group with `WeightedChooser(routing.entry)` (dead workers and groups now in the
decode role excluded), forwards it, and turns the workers' events into an ordered stream for the API layer:
`Accepted`, then `Delta`s (reordered by token index, since the first token comes from the prefill worker and
the rest from a decode worker over another connection), then exactly one terminal `Finished` or `Failed`.

Every request is tracked at the workers that hold it (the entry worker, then also the decode group named
by a `handoff` start, then only that group once the hand-off is done). When a worker is lost (its
connection drops, or no heartbeat for `heartbeat_timeout_s`) the other workers are told to stop sending KV
caches there, and every request it held is retried (up to `max_retries` times; 0 fails it at once with an
error naming the worker); nothing hangs.

Worker liveness, as the router sees it (`WorkerInfo`):
    alive       connected and heard from within `heartbeat_timeout_s`: routed to
    late        silent past the timeout but still connected (starved of CPU, or hung): not routed to, what it
                held is cancelled there and retried elsewhere; re-admitted (configured again) as soon as it
                answers, declared dead and told to stop after `late_grace_s` more of silence
    restarting  dead (disconnected, or late past the grace), and its group is supervised: a new process is
                coming (`launch.supervisor`), which `readmit` connects to and routes to in the same group and
                role; `give_up` makes it dead
    dead        not coming back: re-scheduling re-plans without it
A retry that finds no live entry worker while one is late or restarting waits for it (parked) instead of
failing; it fails once none is expected back.

Retries deliver exactly once: a retry is a new attempt (worker-side id `<id>~r<n>`, so late events of the
old attempt are ignored) submitted to a live entry group with the output already delivered
(`resume_token_ids`, `resume_text_chars`): the worker prefills prompt + those tokens and continues at the next
output index with the same sampling steps, so a greedy or seeded stream continues as if nothing happened.
Any token whose index was already delivered is dropped. A request fails only when no live worker can take
it over or after `max_retries` retries. A KV transfer failure (`kv_transfer_failed`) or a submit that raced
with a role flip (`not_accepting`) is retried the same way; other worker errors fail the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from thunderserve.plan.model import Phase, Plan, Routing
from thunderserve.policy.routing import WeightedChooser
from thunderserve.resched.monitor import InFlight
from thunderserve.runtime.kv.transport import TransportError
from thunderserve.runtime.router_records import (
    Accepted,
    Delta,
    Failed,
    Finished,
    RequestHandle,
    RequestRecord,
    RequestTrack,
    RouterEvent,
    WorkerInfo,
    WorkerLink,
)
from thunderserve.runtime.workers.protocol import GenerateRequest, WorkerState

__all__ = ["Accepted", "Delta", "Failed", "Finished", "RequestHandle", "RequestRecord", "Router", "RouterConfig",
           "RouterEvent", "WorkerInfo"]  # the records' old home: `from thunderserve.runtime.router import ...` works

log = logging.getLogger("thunderserve.router")
RETRYABLE_ERRORS = frozenset({"kv_transfer_failed", "not_accepting"})  # worker error codes another worker fixes


@dataclass(frozen=True)
class RouterConfig:
    heartbeat_timeout_s: float = 15.0  # a worker silent this long is declared dead
    connect_timeout_s: float = 30.0  # connecting to a worker and reading its hello
    request_timeout_s: float | None = None  # fail requests older than this (None: no limit)
    max_pending_requests: int = 10_000  # beyond this, new requests get 503 (overload)
    max_queued_requests: int = 256  # requests without a first token yet; beyond this, new ones get 429
    queue_full_retry_after_s: float = 1.0  # the Retry-After a 429 carries
    monitor_interval_s: float = 0.2
    max_retries: int = 0  # re-submissions of a request whose worker died (0: fail it at once)
    late_grace_s: float = 45.0  # a late worker (no heartbeat for heartbeat_timeout_s) silent this much longer
    #                             is declared dead and told to stop


class Router:
    """Routes requests over the workers of `plan`, reachable at `addresses[group] = (host, control_port)`."""

    def __init__(self, plan: Plan, addresses: Mapping[str, tuple[str, int]], config: RouterConfig = RouterConfig(),
                 clock: Callable[[], float] = time.monotonic, secret: str | None = None) -> None:
        if plan.routing is None:
            raise ValueError("plan has no routing")
        self.plan = plan
        self.config = config
        self.clock = clock
        self._addresses = dict(sorted(addresses.items()))
        self._secret = secret  # the deployment's: proves to each worker that this is its router
        self._entry = WeightedChooser(plan.routing.entry)
        self._links: dict[str, WorkerLink] = {}
        self._requests: dict[str, RequestTrack] = {}  # by client request id
        self._attempts: dict[str, str] = {}  # worker-side attempt id -> client request id
        self.retries_total = 0
        self.moved_total = 0  # requests handed back unstarted and routed again after a routing change
        self._monitor: asyncio.Task[None] | None = None
        self._observers: list[Callable[[RequestRecord], None]] = []
        self._closed = False
        self._supervised: set[str] = set()  # groups whose dead workers are restarted (see `supervise`)
        self._parked: list[RequestTrack] = []  # retries waiting for an entry worker to come back (late, restarting)

    # ---- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect to every worker, read its hello, and configure roles, KV shares and peer addresses."""
        for gid, (host, port) in self._addresses.items():
            self._links[gid] = await self._connect(gid, host, port)
        for gid, link in self._links.items():
            link.role = self.plan.group(gid).phase if gid in {g.id for g in self.plan.groups} else link.role
            await self._configure(link)
            link.reader = asyncio.create_task(self._read_loop(link), name=f"router-read-{gid}")
        self._monitor = asyncio.create_task(self._monitor_loop(), name="router-monitor")

    async def _connect(self, gid: str, host: str, port: int) -> WorkerLink:
        return await WorkerLink.open(gid, host, port, self._secret, self.config.connect_timeout_s, self.clock)

    async def _configure(self, link: WorkerLink) -> None:
        """Tell a worker its role, KV shares, every peer's KV address and which groups are down."""
        peers = {g: [lk.host, lk.kv_port] for g, lk in self._links.items()}
        routing = self.plan.routing or Routing()
        await self._send(link, {"type": "configure", "role": str(link.role), "peers": peers,
                                "kv_shares": routing.kv.get(link.group_id, {}), "down": self._down()})

    def _down(self) -> list[str]:
        return sorted(g for g, lk in self._links.items() if not lk.alive)

    async def _tell_others(self, link: WorkerLink, peers: bool = False) -> None:
        """Every other live worker learns which groups are down (and, with `peers`, every KV address)."""
        msg: dict[str, Any] = {"type": "set_routing", "down": self._down()}
        if peers:
            msg["peers"] = {g: [lk.host, lk.kv_port] for g, lk in self._links.items()}
        for other in list(self._links.values()):
            if other is not link and other.alive:
                await self._send(other, msg)

    # ---- supervision (see `launch.supervisor`) ------------------------------------------------------------
    def supervise(self, groups: list[str]) -> None:
        """Dead workers of these groups are restarted by a supervisor: they show "restarting", not dead."""
        self._supervised = set(groups)

    def in_plan(self, group_id: str) -> bool:
        link = self._links.get(group_id)
        return link is not None and link.in_plan

    def lost_groups(self) -> list[str]:
        """Groups of the plan whose worker is down and being restarted."""
        return sorted(g for g, lk in self._links.items() if lk.restarting and lk.in_plan and not lk.alive)

    def give_up(self, group_id: str, reason: str) -> None:
        """Supervision gave up on the group's worker: it is dead (the controller re-plans without it)."""
        link = self._links.get(group_id)
        if link is not None and not link.alive:
            link.restarting, link.down_reason = False, reason
        if not self.entry_groups() and not self._entry_coming_back():
            for t in list(self._parked):
                self._terminal(t, Failed(503, f"worker '{group_id}' is down: {reason}; no live worker can take the "
                                              "request over", code="worker_failed"), "failed")

    async def readmit(self, group_id: str, host: str, control_port: int) -> None:
        """A restarted worker of `group_id` listens at host:control_port: connect (handshake, hello), configure
        it with the group's current role, KV shares and peers, tell the others its KV address, route to it.
        LookupError when the group is no longer in the plan; TransportError when it cannot be reached."""
        if self._closed or not self.in_plan(group_id):
            raise LookupError(f"group '{group_id}' is not in the plan")
        link = await self._connect(group_id, host, control_port)
        old = self._links.get(group_id)
        if self._closed or old is None or not old.in_plan:  # removed while we connected
            await link.conn.close()
            raise LookupError(f"group '{group_id}' is not in the plan")
        if old.alive or old.late:
            await self._mark_down(old, "replaced by a restarted worker")
        link.role, link.restarts, link.weights_loads = old.role, old.restarts + 1, old.weights_loads + 1
        self._links[group_id] = link
        self._addresses[group_id] = (host, control_port)
        await self._configure(link)
        link.reader = asyncio.create_task(self._read_loop(link), name=f"router-read-{group_id}")
        await self._tell_others(link, peers=True)
        log.warning("worker %s (pid %d) re-admitted as %s (restart %d)", group_id, link.pid, link.role,
                    link.restarts)
        await self._settle_parked()

    async def close(self, shutdown_workers: bool = False) -> None:
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
        for t in list(self._requests.values()):
            self._terminal(t, Failed(503, "server is shutting down", code="shutting_down"), "failed")
        for link in self._links.values():
            if shutdown_workers and (link.alive or link.late):
                with contextlib.suppress(TransportError):
                    await link.conn.send({"type": "shutdown"})
            if link.reader is not None:
                link.reader.cancel()
            await link.conn.close()

    def add_observer(self, fn: Callable[[RequestRecord], None]) -> None:
        """Called with each request's record when it ends (metrics)."""
        self._observers.append(fn)

    # ---- requests -----------------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        return len(self._requests)

    @property
    def num_queued(self) -> int:
        """Pending requests that have not produced a token yet (waiting for or in prefill)."""
        return sum(1 for t in self._requests.values() if t.first_token_s is None)

    def _choose_entry(self) -> str:
        """A live entry group by the current shares; LookupError when none can take requests."""
        live = set(self.entry_groups())
        return self._entry.choose(exclude=[g for g in self._entry.shares if g not in live])

    def entry_groups(self) -> list[str]:
        """Groups that can take a new request now (alive, routed to, not in the decode role)."""
        return [g for g in self._entry.shares if g in self._links and self._links[g].alive
                and self._links[g].role is not Phase.DECODE]

    async def submit(self, req: GenerateRequest) -> RequestHandle:
        handle = RequestHandle(req.request_id)
        now = self.clock()
        if self._closed:
            handle._put(Failed(503, "server is shutting down", code="shutting_down"))
            return handle
        if req.request_id in self._requests:
            handle._put(Failed(400, f"duplicate request id {req.request_id}", "invalid_request_error"))
            return handle
        if len(self._requests) >= self.config.max_pending_requests:
            handle._put(Failed(503, f"server overloaded ({len(self._requests)} requests pending)",
                               code="overloaded", retry_after_s=self.config.queue_full_retry_after_s))
            return handle
        queued = self.num_queued
        if queued >= self.config.max_queued_requests:
            handle._put(Failed(429, f"too many requests queued ({queued}); retry later", "rate_limit_error",
                               code="queue_full", retry_after_s=self.config.queue_full_retry_after_s))
            return handle
        try:
            group = self._choose_entry()
        except LookupError:
            back = self.config.queue_full_retry_after_s if self._entry_coming_back() else None
            handle._put(Failed(503, "no live worker can take requests", code="no_worker", retry_after_s=back))
            return handle
        track = RequestTrack(handle, req, group, now, req.request_id, {group})
        self._requests[req.request_id] = track
        self._attempts[req.request_id] = req.request_id
        try:
            await self._send(self._links[group], {"type": "submit", "request": req.to_dict()})
        except ValueError as exc:  # the request does not fit one frame: nothing was sent, nothing may stay
            self._terminal(track, Failed(413, f"request too large for the runtime: {exc}",
                                         "invalid_request_error", code="request_too_large"), "rejected")
        return handle

    async def cancel(self, request_id: str) -> None:
        """The client went away: drop the request everywhere (no event is delivered)."""
        track = self._requests.get(request_id)
        if track is not None:
            await self._end(track, None, "cancelled")

    # ---- control (AdminState uses these) ----------------------------------------------------------------
    async def set_role(self, group_id: str, role: Phase | str) -> None:
        """Flip a worker's phase live (its weights stay loaded)."""
        link = self._links[group_id]
        phase = Phase(role)
        await self._send(link, {"type": "set_role", "role": str(phase)})
        link.role = phase
        self.plan = self.plan.model_copy(update={"groups": tuple(
            g.with_phase(phase) if g.id == group_id else g for g in self.plan.groups)})
        await self._settle_parked()

    async def update_routing(self, routing: Routing, rebalance: bool = False) -> None:
        """New entry shares here, new KV shares at every worker (applied between their steps). With
        `rebalance`, entry workers hand back the requests they have not started, which are routed again by
        the new shares (a backlog built under the old routing does not stay where it queued)."""
        self._entry.update(routing.entry)
        for gid, link in self._links.items():
            if link.alive:
                await self._send(link, {"type": "set_routing", "kv_shares": routing.kv.get(gid, {})})
        self.plan = self.plan.model_copy(update={"routing": routing})
        await self._settle_parked()
        if rebalance:
            await self._reclaim_unstarted()

    async def _reclaim_unstarted(self) -> None:
        """Ask each entry worker for the requests it holds that produced nothing yet; the ones it has not
        started come back as `reclaimed` events (see `_redispatch`), the others stay where they run."""
        by_group: dict[str, list[str]] = {}
        for t in self._requests.values():
            if t.first_token_s is None and len(t.locations) == 1:
                (g,) = t.locations
                link = self._links.get(g)
                if link is not None and link.alive:
                    by_group.setdefault(g, []).append(t.attempt_id)
        for g, ids in sorted(by_group.items()):
            await self._send(self._links[g], {"type": "reclaim", "request_ids": ids})

    async def remove_group(self, group_id: str, drain_timeout_s: float = 0.0) -> None:
        """Take a group out of the deployment: wait (up to `drain_timeout_s`) for the requests it holds to
        finish, then shut its worker down; what it still holds is retried elsewhere. Idempotent."""
        link = self._links.get(group_id)
        if link is None or not link.in_plan:
            return
        if len(self.plan.groups) == 1 and self.plan.groups[0].id == group_id:
            raise ValueError(f"cannot remove group '{group_id}': it is the last group of the plan")
        deadline = self.clock() + drain_timeout_s
        while link.alive and self._held_at(group_id) and self.clock() < deadline:
            await asyncio.sleep(0.05)
        link.in_plan = False
        if link.alive or link.late:
            await self._send(link, {"type": "shutdown"}, late_ok=True)
            await self._mark_down(link, "removed from the plan by re-scheduling")
        self._entry.update({g: v for g, v in self._entry.shares.items() if g != group_id})
        routing = self.plan.routing or Routing()
        kept = Routing(entry={g: v for g, v in routing.entry.items() if g != group_id},
                       kv={src: {d: v for d, v in dests.items() if d != group_id}
                           for src, dests in routing.kv.items() if src != group_id})
        self.plan = self.plan.model_copy(update={
            "groups": tuple(g for g in self.plan.groups if g.id != group_id), "routing": kept})
        await self._settle_parked()

    def set_estimate(self, estimate: Mapping[str, Any]) -> None:
        """Record the planner's estimate for the plan now running (shown by /admin/plan)."""
        self.plan = self.plan.model_copy(update={"estimate": dict(estimate)})

    def _held_at(self, group_id: str) -> bool:
        return any(group_id in t.locations for t in self._requests.values())

    def in_flight(self) -> dict[str, InFlight]:
        """Accepted requests not yet ended, by client request id (prompt known, output so far)."""
        return {rid: InFlight(t.arrival_s, t.prompt_tokens, t.completion_tokens)
                for rid, t in self._requests.items() if t.accepted}

    def workers(self) -> list[WorkerInfo]:
        now = self.clock()
        held: dict[str, int] = {}
        for t in self._requests.values():
            for g in t.locations:
                held[g] = held.get(g, 0) + 1
        return [WorkerInfo(g, str(lk.role), lk.alive, lk.pid, lk.host, lk.port, lk.kv_port, lk.weights_token,
                           lk.max_context_tokens, lk.down_reason, now - lk.last_heartbeat_s, lk.state,
                           lk.in_plan, lk.weights_loads, held.get(g, 0), lk.late, lk.restarting, lk.restarts)
                for g, lk in sorted(self._links.items())]

    @property
    def max_context_tokens(self) -> int:
        return min((lk.max_context_tokens for lk in self._links.values()), default=0)

    # ---- worker links ------------------------------------------------------------------------------------
    async def _send(self, link: WorkerLink, header: dict[str, Any], late_ok: bool = False) -> None:
        """Send to a live worker (`late_ok`: or a late one); a failure marks it down."""
        if not (link.alive or (late_ok and link.late)):
            return
        try:
            await link.conn.send(header)
        except TransportError as exc:
            await self._mark_down(link, f"send failed: {exc}")

    async def _read_loop(self, link: WorkerLink) -> None:
        try:
            while True:
                frame = await link.conn.recv()
                h = frame.header
                kind = h.get("type")
                if link.late and kind in ("heartbeat", "events"):
                    await self._answered_again(link)
                if kind == "heartbeat":
                    link.last_heartbeat_s = self.clock()
                    link.state = WorkerState.from_dict(h["state"])
                    if link.state.weights_token != link.weights_token:  # the weights were (re)loaded
                        link.weights_loads += 1
                        link.weights_token = link.state.weights_token
                elif kind == "events":
                    link.last_heartbeat_s = self.clock()
                    for ev in h["events"]:
                        await self._on_event(link, ev)
        except TransportError as exc:
            if not self._closed:
                await self._mark_down(link, f"connection lost ({exc})")

    async def _mark_down(self, link: WorkerLink, reason: str, fence: bool = False) -> None:
        """Declare a worker lost; `fence`: it may still run (silent, not disconnected), so tell it to stop
        rather than let it compute for requests that are retried elsewhere."""
        if not link.alive and not link.late:
            return
        was_alive, link.alive, link.late = link.alive, False, False
        link.restarting = link.in_plan and link.group_id in self._supervised and not self._closed
        if fence:
            with contextlib.suppress(TransportError):
                await link.conn.send({"type": "shutdown"})
        link.down_reason = reason
        if link.in_plan:
            log.error("worker %s (pid %d) is down: %s%s", link.group_id, link.pid, reason,
                      "; restarting it" if link.restarting else "")
        msg = f"worker '{link.group_id}' (pid {link.pid}) is down: {reason}"
        if was_alive:  # first, so that no retry's KV is shipped to it (a late one was already announced)
            await self._tell_others(link)
        for track in [t for t in self._requests.values() if link.group_id in t.locations]:
            await self._retry(track, msg)
        if link.reader is not None and link.reader is not asyncio.current_task():
            link.reader.cancel()
        await link.conn.close()
        await self._settle_parked()

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.monitor_interval_s)
            now = self.clock()
            for link in list(self._links.values()):
                silent = now - link.last_heartbeat_s
                if link.alive and silent > self.config.heartbeat_timeout_s:
                    await self._mark_late(link, silent)
                elif link.late and silent > self.config.heartbeat_timeout_s + self.config.late_grace_s:
                    await self._mark_down(link, f"no heartbeat for {silent:.1f} s", fence=True)
            limit = self.config.request_timeout_s
            if limit is not None:
                for t in [t for t in self._requests.values() if now - t.arrival_s > limit]:
                    await self._end(t, Failed(504, f"request timed out after {limit:g} s", code="timeout"),
                                    "failed")

    async def _mark_late(self, link: WorkerLink, silent_s: float) -> None:
        """A worker silent past the heartbeat timeout but still connected (starved of CPU, or hung): route
        nothing to it, cancel what it holds and retry that elsewhere, keep the link; it is re-admitted when
        it answers again, and declared dead (told to stop) after `late_grace_s` more of silence."""
        link.alive, link.late = False, True
        link.down_reason = f"no heartbeat for {silent_s:.1f} s (late; back in when it answers again)"
        log.error("worker %s (pid %d) is late: %s", link.group_id, link.pid, link.down_reason)
        await self._tell_others(link)
        msg = f"worker '{link.group_id}' (pid {link.pid}) is down: no heartbeat for {silent_s:.1f} s"
        for track in [t for t in self._requests.values() if link.group_id in t.locations]:
            await self._retry(track, msg)

    async def _answered_again(self, link: WorkerLink) -> None:
        """A late worker spoke: configure it again (routing may have changed meanwhile) and route to it."""
        if not link.in_plan:
            return
        link.alive, link.late, link.down_reason = True, False, ""
        log.warning("worker %s (pid %d) answers again after %.1f s; re-admitted", link.group_id, link.pid,
                    self.clock() - link.last_heartbeat_s)
        await self._configure(link)
        await self._tell_others(link)
        await self._settle_parked()

    # ---- events ------------------------------------------------------------------------------------------
    async def _on_event(self, link: WorkerLink, ev: dict[str, Any]) -> None:
        attempt = str(ev.get("request_id"))
        cid = self._attempts.get(attempt)
        track = self._requests.get(cid) if cid is not None else None
        kind = ev.get("kind")
        if track is None:  # late event of a request (or an attempt) that already ended
            if (kind == "output" and not ev.get("finish_reason")) or \
                    (kind == "handoff" and ev.get("state") == "start"):
                await self._send(link, {"type": "cancel", "request_id": attempt})  # an orphan: stop it
            return
        if kind == "accepted":
            if not track.accepted:  # a retry's accepted is not news to the client
                track.accepted = True
                track.prompt_tokens = int(ev["prompt_tokens"])
                track.handle._put(Accepted(track.prompt_tokens, int(ev["max_tokens"])))
        elif kind == "rejected":
            if track.retries:  # the client's request was fine; the worker refused to take it over
                await self._end(track, Failed(503, str(ev["message"]), code="retry_rejected"), "failed")
            else:
                await self._end(track, Failed(400, str(ev["message"]), "invalid_request_error", ev.get("param"),
                                              ev.get("code")), "rejected")
        elif kind == "error":
            if ev.get("code") in RETRYABLE_ERRORS:
                await self._retry(track, str(ev["message"]))
            else:
                await self._end(track, Failed(503, str(ev["message"]), code="worker_error"), "failed")
        elif kind == "reclaimed":
            await self._redispatch(track)
        elif kind == "handoff":
            dest = str(ev["to"])
            if ev.get("state") == "start":
                dest_link = self._links.get(dest)
                if dest_link is None or not dest_link.alive:
                    reason = dest_link.down_reason if dest_link is not None else "unknown group"
                    await self._retry(track, f"decode worker '{dest}' is down: {reason}")
                    return
                track.locations.add(dest)
            else:
                track.locations.discard(link.group_id)
        elif kind == "output":
            index = int(ev["index"])
            if index < track.next_index:
                return  # already delivered (exactly once)
            track.pending[index] = ev
            while track.next_index in track.pending:
                out = track.pending.pop(track.next_index)
                ids = tuple(int(t) for t in out["token_ids"])
                text = str(out["text"])
                track.next_index += len(ids)
                track.completion_tokens += len(ids)
                track.delivered_ids.extend(ids)
                track.delivered_chars += len(text)
                if track.first_token_s is None:
                    track.first_token_s = self.clock()
                track.handle._put(Delta(text, ids, int(out["index"])))
                if out.get("finish_reason"):
                    await self._end(track, Finished(str(out["finish_reason"]), track.prompt_tokens,
                                                    track.completion_tokens), "finished")
                    return

    async def _redispatch(self, track: RequestTrack) -> None:
        """A worker handed the request back unstarted: route it again by the current shares, as a new attempt
        (not a retry: nothing was lost). Exactly once holds because the old worker no longer holds it."""
        if track.handle.done:
            return
        try:
            group = self._choose_entry()
        except LookupError:
            await self._retry(track, "handed back on a routing change, and no live worker can take it")
            return
        track.moves += 1
        self.moved_total += 1
        await self._send_attempt(track, f"{track.handle.request_id}~m{track.moves}", group)

    async def _send_attempt(self, track: RequestTrack, attempt_id: str, group: str) -> None:
        """Submit what is left of the request to `group` as attempt `attempt_id` (resuming after the output
        already delivered); the previous attempt's id no longer maps to it."""
        self._attempts.pop(track.attempt_id, None)
        track.attempt_id = attempt_id
        self._attempts[attempt_id] = track.handle.request_id
        track.locations = {group}
        req = dataclasses.replace(track.request, request_id=attempt_id,
                                  resume_token_ids=tuple(track.delivered_ids),
                                  resume_text_chars=track.delivered_chars)
        await self._send(self._links[group], {"type": "submit", "request": req.to_dict()})

    async def _retry(self, track: RequestTrack, reason: str) -> None:
        """The current attempt is lost: cancel its leftovers and re-submit what is left to a live entry
        group, resuming after the output already delivered; fail only when that is impossible."""
        if track.handle.done:
            return
        old, held = track.attempt_id, sorted(track.locations)
        self._attempts.pop(old, None)  # detach first: a failure while cancelling must not retry it twice
        track.locations = set()
        track.pending.clear()
        for g in held:
            link = self._links.get(g)
            if link is not None and (link.alive or link.late):
                await self._send(link, {"type": "cancel", "request_id": old}, late_ok=True)
        if track.handle.done:
            return
        if track.retries >= self.config.max_retries:
            suffix = f" (gave up after {track.retries} retries)" if track.retries else ""
            self._terminal(track, Failed(503, reason + suffix, code="worker_failed"), "failed")
            return
        try:
            group = self._choose_entry()
        except LookupError:
            if self._entry_coming_back():  # wait for it rather than fail an accepted request
                log.warning("request %s: %s; waiting for an entry worker to come back", track.handle.request_id,
                            reason)
                self._parked.append(track)
                return
            self._terminal(track, Failed(503, f"{reason}; no live worker can take the request over",
                                         code="worker_failed"), "failed")
            return
        await self._resubmit(track, group, reason)

    async def _resubmit(self, track: RequestTrack, group: str, reason: str) -> None:
        track.retries += 1
        self.retries_total += 1
        rid = track.handle.request_id
        log.warning("request %s: %s; retry %d on %s after %d delivered tokens", rid, reason, track.retries,
                    group, len(track.delivered_ids))
        await self._send_attempt(track, f"{rid}~r{track.retries}", group)

    def _entry_coming_back(self) -> bool:
        """An entry group of the routing has a worker that is late or being restarted (expected back)."""
        return any(g in self._links and self._links[g].in_plan and (self._links[g].late or self._links[g].restarting)
                   and self._links[g].role is not Phase.DECODE for g in self._entry.shares)

    async def _settle_parked(self) -> None:
        """Retries parked while no entry worker was live: send them once one is, fail them once none is
        expected back (otherwise they keep waiting; `request_timeout_s` still applies)."""
        parked, self._parked = [t for t in self._parked if not t.handle.done], []
        if parked and (self.entry_groups() or not self._entry_coming_back()):
            for t in parked:  # re-submitted now, or failed (nobody is coming back), or parked again
                await self._retry(t, "waited for an entry worker to come back")
        else:
            self._parked += parked

    async def _end(self, track: RequestTrack, event: RouterEvent | None, outcome: str) -> None:
        """Terminal transition (exactly once per request); failures cancel leftovers at live workers."""
        if track.handle.done:
            return
        self._terminal(track, event, outcome)
        if outcome in ("failed", "cancelled"):
            for g in sorted(track.locations):
                link = self._links.get(g)
                if link is not None and link.alive:
                    await self._send(link, {"type": "cancel", "request_id": track.attempt_id})

    def _terminal(self, track: RequestTrack, event: RouterEvent | None, outcome: str) -> None:
        if track.handle.done:
            return
        track.handle.done = True
        if track in self._parked:
            self._parked.remove(track)
        self._requests.pop(track.handle.request_id, None)
        self._attempts.pop(track.attempt_id, None)
        if event is not None:
            track.handle._put(event)
        record = RequestRecord(track.handle.request_id, track.entry_group, outcome, track.arrival_s,
                               track.first_token_s, self.clock(), track.prompt_tokens, track.completion_tokens,
                               track.retries)
        for fn in self._observers:
            try:
                fn(record)
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("request observer failed")
