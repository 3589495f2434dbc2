"""A worker process: a `WorkerCore` behind two TCP servers (control from the router, KV from peers).

Worker lifecycle:
    start     load the engine once (weights stay for the process lifetime: `weights_token` never changes),
              open the control server and the KV receiver, report (control port, KV port) to the launcher
    serve     the router connects to the control port; the worker says `hello`, the router sends
              `configure` (role, KV shares, peer KV addresses); from then on: `submit`/`cancel`/`reclaim`
              requests, `set_role`/`set_routing` changes, all queued in arrival order and applied together
              between steps (a burst of submits joins one prefill batch), `events` and `heartbeat` back;
              with a secret, only a peer that passed the handshake is heard, and a new authenticated router
              connection replaces the old one (a router reconnecting); a malformed message closes its link
    step loop while the core has work, run `core.step()` on a single-thread executor (the engine computes
              off the event loop, so heartbeats and transfers keep flowing) and ship resulting KV caches
    stop      `shutdown` from the router, SIGTERM/SIGINT, or the parent process dying (watchdog) -> close the
              servers and exit; a new router connection replaces an old one (the worker keeps its state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from thunderserve.plan.model import Phase
from thunderserve.runtime.engine.base import EngineProtocol
from thunderserve.runtime.kv.transport import (
    MAX_HEADER_BYTES,
    FrameConnection,
    FrameServer,
    KvReceiver,
    KvSender,
    TransportError,
)
from thunderserve.runtime.workers.codec import KvCodec
from thunderserve.runtime.workers.core import KvHandoff, WorkerCore
from thunderserve.runtime.workers.protocol import GenerateRequest, WorkerConfig

log = logging.getLogger("thunderserve.worker")
T = TypeVar("T")


class WorkerServer:
    """Runs one worker in the current asyncio loop (a process, a Ray actor, or a test)."""

    def __init__(self, engine: EngineProtocol, config: WorkerConfig, codec: KvCodec, host: str = "127.0.0.1",
                 advertise_host: str | None = None, pid: int | None = None, secret: str | None = None) -> None:
        self.core = WorkerCore(engine, config, codec)
        self._secret = secret  # the deployment's: peers prove it before any frame is honoured (None: in-process)
        self.config = config
        self.host = host
        self.advertise_host = advertise_host or host
        self.pid = pid if pid is not None else os.getpid()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ts-worker-{config.group_id}")
        self._control = FrameServer(self._on_router, timeout_s=config.kv_timeout_s, secret=secret,
                                    purpose="control", max_header_bytes=MAX_HEADER_BYTES, max_payload_bytes=0)
        self._kv = KvReceiver(self._on_kv, timeout_s=config.kv_timeout_s, secret=secret,
                              max_payload_bytes=config.kv_frame_max_bytes)
        self._router: FrameConnection | None = None
        self._peers: dict[str, tuple[str, int]] = {}
        self._senders: dict[str, KvSender] = {}
        self._wake = asyncio.Event()
        self._flush_wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._send_tasks: set[asyncio.Task[Any]] = set()
        # core calls from control messages, applied in order on the compute thread between steps
        self._inbox: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._stop_started = False
        self._stop_task: asyncio.Task[None] | None = None  # a stop the worker started itself (broken engine)
        self.kv_bytes_sent: dict[str, int] = {}
        self.kv_bytes_received = 0
        self.control_port = 0
        self.kv_port = 0

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> tuple[int, int]:
        self.control_port = await self._control.start(self.host, 0)
        self.kv_port = await self._kv.start(self.host, 0)
        self._tasks = [asyncio.create_task(self._step_loop(), name="step-loop"),
                       asyncio.create_task(self._flush_loop(), name="flush-loop"),
                       asyncio.create_task(self._heartbeat_loop(), name="heartbeat")]
        return self.control_port, self.kv_port

    def request_stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        if self._stop_started:
            return
        self._stop_started = True
        self.request_stop()
        for t in [*self._tasks, *self._send_tasks]:
            t.cancel()
        for t in [*self._tasks, *self._send_tasks]:
            with contextlib.suppress(BaseException):
                await t
        for sender in self._senders.values():
            await sender.close()
        if self._router is not None:
            await self._router.close()
        await self._control.close()
        await self._kv.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a core method on the worker's single compute thread (serialised with steps)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- router link ------------------------------------------------------------------------------
    async def _on_router(self, conn: FrameConnection) -> None:
        old, self._router = self._router, conn
        if old is not None:
            await old.close()
        await conn.send({"type": "hello", "group": self.config.group_id, "pid": self.pid,
                         "role": str(self.core.role), "weights_token": int(self.core.engine.weights_token),
                         "host": self.advertise_host, "kv_port": self.kv_port,
                         "max_context_tokens": int(self.core.engine.max_context_tokens)})
        try:
            while not self._stopped.is_set():
                frame = await conn.recv()
                try:
                    await self._handle_control(frame.header)
                except Exception as exc:  # noqa: BLE001 - a malformed message ends this link, not the worker
                    log.warning("worker %s: bad control message (%s: %s); closing the link",
                                self.config.group_id, type(exc).__name__, exc)
                    return
        finally:
            if self._router is conn:
                self._router = None

    async def _handle_control(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "submit":
            self._post(self.core.submit, GenerateRequest.from_dict(msg["request"]))
        elif kind == "cancel":
            self._post(self.core.cancel, str(msg["request_id"]))
        elif kind == "reclaim":
            self._post(self.core.reclaim, [str(r) for r in msg.get("request_ids", [])])
        elif kind in ("configure", "set_routing"):
            if "peers" in msg:
                self._peers = {g: (str(a[0]), int(a[1])) for g, a in msg["peers"].items()}
            if kind == "configure" and "role" in msg:
                self._post(self.core.set_role, Phase(msg["role"]))
            self._post(self.core.set_kv_routing, msg.get("kv_shares"), msg.get("down"))
        elif kind == "set_role":
            self._post(self.core.set_role, Phase(msg["role"]))
        elif kind == "shutdown":
            self.request_stop()
        else:
            log.warning("worker %s: unknown control message %r", self.config.group_id, kind)
        self._wake.set()
        self._flush_wake.set()

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a core call from a control message; the step loop applies every queued call, in arrival
        order, on the compute thread before its next step. So messages that arrive during a step are all
        taken in at once (a burst of submits is prefilled as one batch), not one per step."""
        self._inbox.append((fn, args))

    def _apply_inbox(self) -> None:
        """(compute thread) Apply the queued control calls in order; one that raises is logged, not fatal."""
        while self._inbox:
            fn, args = self._inbox.popleft()
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a bad message must not stop the worker
                log.exception("worker %s: control call %s failed", self.config.group_id,
                              getattr(fn, "__name__", fn))

    async def _send_router(self, header: dict[str, Any]) -> None:
        conn = self._router
        if conn is None:
            return
        try:
            await conn.send(header)
        except TransportError:
            await conn.close()

    # ---- loops ------------------------------------------------------------------------------------
    async def _step_loop(self) -> None:
        while not self._stopped.is_set():
            self._wake.clear()
            if self._inbox:
                await self._run(self._apply_inbox)
                self._flush_wake.set()
            if not self.core.has_work():
                if not self._inbox:
                    await self._wake.wait()
                continue
            try:
                result = await self._run(self.core.step)
            except Exception as exc:  # noqa: BLE001 - a bug must fail requests visibly, not hang them
                if self._engine_broken():
                    return
                log.exception("worker %s: step failed", self.config.group_id)
                await self._run(self.core.fail_all, f"worker {self.config.group_id} failed: {exc!r}")
                self._flush_wake.set()
                continue
            if self._engine_broken():
                return
            for h in result.handoffs:
                task = asyncio.create_task(self._send_kv(h))
                self._send_tasks.add(task)
                task.add_done_callback(self._send_tasks.discard)
            self._flush_wake.set()

    def _engine_broken(self) -> bool:
        """An engine that can no longer compute (a tensor-parallel group that lost a rank) takes the worker
        down at once, before the step's failure events reach the router: the router then sees a dead worker
        and retries its requests elsewhere (as after kill -9) instead of failing them."""
        reason = self.core.engine_broken()
        if not reason:
            return False
        log.error("worker %s: engine is down (%s); stopping so its requests are retried elsewhere",
                  self.config.group_id, reason)
        self.request_stop()
        self._stop_task = asyncio.create_task(self.stop())
        return True

    async def _flush_loop(self) -> None:
        while not self._stopped.is_set():
            await self._flush_wake.wait()
            self._flush_wake.clear()
            events = self.core.drain_events()
            if events:
                await self._send_router({"type": "events", "events": events})

    async def _heartbeat_loop(self) -> None:
        while not self._stopped.is_set():
            state = self.core.state(self.pid)
            d = state.to_dict()
            d["kv_bytes_sent"] = dict(sorted(self.kv_bytes_sent.items()))
            d["kv_bytes_received"] = self.kv_bytes_received
            await self._send_router({"type": "heartbeat", "time_s": time.time(), "state": d})
            await asyncio.sleep(self.config.heartbeat_interval_s)

    # ---- KV ---------------------------------------------------------------------------------------
    def _sender(self, group: str) -> KvSender | None:
        if group not in self._peers:
            return None
        host, port = self._peers[group]
        sender = self._senders.get(group)
        if sender is None or (sender.host, sender.port) != (host, port):
            sender = KvSender(host, port, timeout_s=self.config.kv_timeout_s, secret=self._secret)
            self._senders[group] = sender
        return sender

    async def _send_kv(self, h: KvHandoff) -> None:
        sender = self._sender(h.dest_group)
        if sender is None:
            ok, error = False, f"no address known for decode group {h.dest_group}"
        else:
            try:
                ack = await sender.send_kv(h.request_id, h.meta, h.payload)
                ok, error = ack.ok, ack.error
            except TransportError as exc:
                ok, error = False, str(exc)
        if ok:
            self.kv_bytes_sent[h.dest_group] = self.kv_bytes_sent.get(h.dest_group, 0) + len(h.payload)
        await self._run(self.core.handoff_finished, h.request_id, h.dest_group, ok, error)
        self._wake.set()
        self._flush_wake.set()

    async def _on_kv(self, header: dict[str, Any], payload: bytes) -> None:
        await self._run(self.core.import_kv, str(header["request_id"]), header["meta"], payload)
        self.kv_bytes_received += len(payload)
        self._wake.set()


# ---- process entry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerLaunchSpec:
    """Everything a launcher needs to start one worker process (picklable)."""

    config: WorkerConfig
    model: str  # engine model reference: a HuggingFace directory, "smollm2", or "fake[:max_context]"
    cpu_threads: int = 1  # torch intra-op threads
    host: str = "127.0.0.1"  # bind address of the worker's servers
    advertise_host: str | None = None  # address peers use to reach it (default: host)
    device: str = "cpu"  # torch device of a single-stage group
    stages: tuple[tuple[int, int, str], ...] = ()  # (first_layer, end_layer, device) per pipeline stage, if > 1
    tp: int = 1  # tensor-parallel degree: this worker is rank 0 and spawns tp-1 followers
    rank_devices: tuple[tuple[str, ...], ...] = ()  # [tp rank][stage] torch device (default: rank 0's devices)
    secret: str | None = field(default=None, repr=False)  # deployment secret (handed over with the spec, never
    #                                                         on a command line or in the environment)


def build_engine(model: str, device: str = "cpu", stages: tuple[tuple[int, int, str], ...] = (),
                 tp: int = 1, rank_devices: tuple[tuple[str, ...], ...] = (), cpu_threads: int = 1
                 ) -> EngineProtocol:
    """Load the engine for `model`: one stage, a pipeline of stage engines, either over tp ranks
    (`workers.tensor_parallel`), or ("fake[:context]") the fake."""
    if model == "fake" or model.startswith("fake:"):
        from thunderserve.runtime.fakes import FakeEngine

        return FakeEngine(max_context_tokens=int(model.split(":", 1)[1]) if ":" in model else 512)
    if tp > 1:
        from thunderserve.runtime.workers.tensor_parallel import start_tp_engine, tp_spec

        return start_tp_engine(tp_spec(model, tp, device, stages, rank_devices, cpu_threads))
    if len(stages) > 1:
        from thunderserve.runtime.workers.pipeline import load_pipeline

        return load_pipeline(model, stages)
    from thunderserve.runtime.engine import load_engine

    return load_engine(model, device=device)


def make_codec(model: str, compression: str, device: str = "cpu") -> KvCodec:
    """The plan's KV codec (quantize at its compression); the fake engine's exact caches travel raw."""
    from thunderserve.runtime.workers.codec import QuantizeKvCodec

    if (model == "fake" or model.startswith("fake:")) and compression == "none":
        from thunderserve.runtime.fakes import RawKvCodec

        return RawKvCodec()
    return QuantizeKvCodec(compression, device)


async def serve_worker(spec: WorkerLaunchSpec, on_ready: Callable[[dict[str, Any]], None],
                       watch_parent: bool = True, stop_event: threading.Event | None = None) -> None:
    """Load, serve until told to stop, then clean up (the body of a worker process or actor)."""
    import torch

    torch.set_num_threads(max(1, spec.cpu_threads))
    engine = build_engine(spec.model, spec.device, spec.stages, spec.tp, spec.rank_devices, spec.cpu_threads)
    try:
        await _serve_engine(spec, engine, on_ready, watch_parent, stop_event)
    finally:
        close = getattr(engine, "close", None)  # a TP engine's follower processes go with the worker
        if close is not None:
            close()


async def _serve_engine(spec: WorkerLaunchSpec, engine: EngineProtocol, on_ready: Callable[[dict[str, Any]], None],
                        watch_parent: bool, stop_event: threading.Event | None) -> None:
    with contextlib.suppress(Exception):  # load the tokenizer now, not on the first request (a stage may have none)
        engine.decode_text(engine.encode("warm up"))
    codec = make_codec(spec.model, str(spec.config.compression), spec.device)
    server = WorkerServer(engine, spec.config, codec, host=spec.host, advertise_host=spec.advertise_host,
                          secret=spec.secret)
    control_port, kv_port = await server.start()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
    watchers: list[asyncio.Task[Any]] = []
    if watch_parent:
        watchers.append(asyncio.create_task(_watch_parent(server, os.getppid())))
    if stop_event is not None:
        watchers.append(asyncio.create_task(_watch_event(server, stop_event)))
    on_ready({"group": spec.config.group_id, "pid": os.getpid(), "host": server.advertise_host,
              "control_port": control_port, "kv_port": kv_port, "weights_token": int(engine.weights_token)})
    try:
        await server.wait_stopped()
    finally:
        for w in watchers:
            w.cancel()
        await server.stop()


async def _watch_parent(server: WorkerServer, parent_pid: int) -> None:
    """Exit when the launching process dies (we get re-parented): no orphan workers."""
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent_pid:
            log.warning("worker %s: parent %d is gone, exiting", server.config.group_id, parent_pid)
            server.request_stop()
            return


async def _watch_event(server: WorkerServer, event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.2)
    server.request_stop()
