"""Records of the built-in router (`runtime.router`): what it hands the API layer (events, in order, on a
`RequestHandle`), what it reports (`RequestRecord` per ended request, `WorkerInfo` per worker; the vLLM router
reports the same, see `runtime.frontend`), and the state it keeps per request (`RequestTrack`) and per worker
control connection (`WorkerLink`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from thunderserve.plan.model import Phase
from thunderserve.runtime.kv.transport import FrameConnection, TransportError, client_handshake
from thunderserve.runtime.workers.protocol import GenerateRequest, WorkerState


@dataclass(frozen=True)
class Accepted:
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]
    index: int  # position of token_ids[0] in the output


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    status: int  # HTTP status the client should see (400 invalid request, 503 runtime failure)
    message: str
    error_type: str = "server_error"  # OpenAI error "type"
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None  # set on 429 (queue full): when the client may try again


RouterEvent = Accepted | Delta | Finished | Failed


@dataclass(frozen=True)
class RequestRecord:
    """One completed (or failed) request, for metrics."""

    request_id: str
    entry_group: str
    outcome: str  # "finished" | "failed" | "rejected" | "cancelled"
    arrival_s: float
    first_token_s: float | None
    finish_s: float
    prompt_tokens: int
    completion_tokens: int
    retries: int = 0  # times it was re-submitted after a worker failure

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_token_s is None or self.completion_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.completion_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.finish_s - self.arrival_s


class RequestHandle:
    """The API layer's end of one request: iterate to get its events (ends after the terminal one)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RouterEvent] = asyncio.Queue()
        self.done = False

    def _put(self, event: RouterEvent) -> None:
        self._queue.put_nowait(event)

    async def next(self) -> RouterEvent:
        return await self._queue.get()

    async def __aiter__(self) -> AsyncIterator[RouterEvent]:
        while True:
            ev = await self._queue.get()
            yield ev
            if isinstance(ev, Finished | Failed):
                return


@dataclass
class WorkerInfo:
    """What the router knows about one worker (for /admin/workers, /health and /metrics)."""

    group_id: str
    role: str
    alive: bool
    pid: int
    host: str
    control_port: int
    kv_port: int
    weights_token: int  # latest reported (hello, then heartbeats): a weight reload would change it
    max_context_tokens: int
    down_reason: str = ""
    heartbeat_age_s: float = 0.0
    state: WorkerState | None = None
    in_plan: bool = True  # False once a re-plan removed its group
    weights_loads: int = 1  # weight loads seen: 1 at start, +1 whenever the reported weights_token changes
    held_requests: int = 0  # unfinished requests the router has placed on this worker (its own view, not a heartbeat)
    late: bool = False  # silent past the heartbeat timeout but connected: back in when it answers again
    restarting: bool = False  # its process died and supervision is restarting it (see `launch.supervisor`)
    restarts: int = 0  # times its worker was restarted and re-admitted


# ---- the router's own state ---------------------------------------------------------------------------
@dataclass
class RequestTrack:
    """The router's state of one request: where its current attempt runs, what was delivered."""

    handle: RequestHandle
    request: GenerateRequest  # as the client sent it (retries derive from it)
    entry_group: str
    arrival_s: float
    attempt_id: str  # the request id the workers know the current attempt by
    locations: set[str] = field(default_factory=set)
    next_index: int = 0  # output index of the next token to deliver (= tokens delivered)
    pending: dict[int, dict[str, Any]] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    accepted: bool = False
    delivered_ids: list[int] = field(default_factory=list)
    delivered_chars: int = 0
    retries: int = 0
    moves: int = 0  # times an entry worker handed it back unstarted and it was routed again (re-routing)


class WorkerLink:
    """The router's control connection to one worker, and what it knows of that worker."""

    def __init__(self, group_id: str, conn: FrameConnection, hello: dict[str, Any], port: int, now: float) -> None:
        self.group_id = group_id
        self.conn = conn
        self.port = port
        self.alive = True
        self.down_reason = ""
        self.pid = int(hello["pid"])
        self.role = Phase(hello["role"])
        self.weights_token = int(hello["weights_token"])
        self.host = str(hello["host"])
        self.kv_port = int(hello["kv_port"])
        self.max_context_tokens = int(hello["max_context_tokens"])
        self.last_heartbeat_s = now
        self.state: WorkerState | None = None
        self.reader: asyncio.Task[None] | None = None
        self.weights_loads = 1
        self.in_plan = True
        self.late = False  # silent past the heartbeat timeout, still connected (not alive, not dead yet)
        self.restarting = False  # dead, and supervision will bring a new process back for the group
        self.restarts = 0

    @classmethod
    async def open(cls, gid: str, host: str, port: int, secret: str | None, timeout_s: float,
                   clock: Callable[[], float]) -> WorkerLink:
        """Connect to a worker's control port, prove the deployment's secret, read its hello."""
        conn = await FrameConnection.connect(host, port, timeout_s)
        try:
            if secret is not None:
                await client_handshake(conn, secret, "control", timeout_s)
            frame = await conn.recv(idle_timeout_s=timeout_s)
            if frame.header.get("type") != "hello":
                raise TransportError(f"worker {gid} at {host}:{port} did not say hello: {frame.header!r}")
            return cls(gid, conn, frame.header, port, clock())
        except BaseException:
            await conn.close()
            raise
