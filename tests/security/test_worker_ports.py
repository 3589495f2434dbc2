"""Worker control and KV ports honour nothing before the peer proves the deployment secret; oversized or
malformed frames close that connection, never the worker, and never steal the router's link."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from runtime_builders import pd_plan, request, run_request

from thunderserve.runtime.fakes import FakeEngine, RawKvCodec
from thunderserve.runtime.kv.transport import (
    MAGIC,
    FrameConnection,
    KvSender,
    PeerClosedError,
    TransportError,
    client_handshake,
    new_secret,
)
from thunderserve.runtime.router import Finished, Router, RouterConfig
from thunderserve.runtime.workers.protocol import WorkerConfig
from thunderserve.runtime.workers.server import WorkerServer

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def secured(secret: str, kv_cap: int = 1 << 20) -> AsyncIterator[tuple[Router, dict[str, WorkerServer]]]:
    plan = pd_plan()
    servers = {}
    for g in plan.groups:
        cfg = WorkerConfig(group_id=g.id, role=g.phase, heartbeat_interval_s=0.05, kv_timeout_s=5.0,
                           kv_frame_max_bytes=kv_cap)
        servers[g.id] = WorkerServer(FakeEngine(), cfg, RawKvCodec(), secret=secret)
        await servers[g.id].start()
    router = Router(plan, {g: ("127.0.0.1", s.control_port) for g, s in servers.items()},
                    RouterConfig(heartbeat_timeout_s=5.0, monitor_interval_s=0.05), secret=secret)
    await router.start()
    try:
        yield router, servers
    finally:
        await router.close()
        for s in servers.values():
            await s.stop()


async def _served(router: Router) -> bool:
    out = await run_request(router, request(prompt="still here", max_tokens=4))
    return isinstance(out.terminal, Finished) and len(out.token_ids) == 4


async def _closed(conn: FrameConnection) -> bool:
    """The server closed the connection (reads end) within a bounded wait."""
    try:
        while True:
            await conn.recv(idle_timeout_s=15)
    except PeerClosedError:
        return True
    except TransportError:
        return False


async def test_unauthenticated_frames_are_ignored_and_the_link_is_kept() -> None:
    secret = new_secret()
    async with secured(secret) as (router, servers):
        port = servers["d0"].control_port
        # a public-format shutdown frame, sent without answering the challenge
        stray = await FrameConnection.connect("127.0.0.1", port)
        challenge = await stray.recv(idle_timeout_s=5)
        assert challenge.header["type"] == "challenge"
        await stray.send({"type": "shutdown"})
        assert await _closed(stray)
        # a wrong secret
        wrong = await FrameConnection.connect("127.0.0.1", port)
        await client_handshake(wrong, new_secret(), "control")
        assert await _closed(wrong)
        # a frame announcing 64 GiB before authentication
        raw_reader, raw_writer = await asyncio.open_connection("127.0.0.1", port)
        raw_writer.write(struct.pack(">4sIQI", MAGIC, 10, 64 * 1024**3, 0))
        await raw_writer.drain()
        await asyncio.wait_for(raw_reader.read(), 15)  # the challenge, then EOF: the worker hung up
        assert raw_reader.at_eof()
        raw_writer.close()
        assert all(w.alive for w in router.workers()) and not servers["d0"]._stopped.is_set()
        assert await _served(router)


async def test_a_router_with_the_wrong_secret_cannot_take_over() -> None:
    secret = new_secret()
    async with secured(secret) as (router, servers):
        intruder = Router(router.plan, {g: ("127.0.0.1", s.control_port) for g, s in servers.items()},
                          RouterConfig(connect_timeout_s=5), secret=new_secret())
        with pytest.raises(TransportError):
            await intruder.start()
        await intruder.close()
        assert await _served(router)


async def test_kv_port_needs_the_secret_and_caps_payloads_at_what_the_model_needs() -> None:
    secret = new_secret()
    async with secured(secret, kv_cap=4096) as (router, servers):
        port = servers["d0"]._kv.port
        with pytest.raises(TransportError):  # no secret: the challenge is not answered, nothing is read
            await KvSender("127.0.0.1", port, timeout_s=15).send_kv("x", {}, b"\0" * 10)
        with pytest.raises(TransportError):  # a wrong secret: the worker hangs up
            await KvSender("127.0.0.1", port, timeout_s=5, secret=new_secret()).send_kv("x", {}, b"")
        with pytest.raises(TransportError):  # authenticated, but larger than the model could ever need
            await KvSender("127.0.0.1", port, timeout_s=5, secret=secret).send_kv("x", {}, b"\0" * 8192)
        ack = await KvSender("127.0.0.1", port, timeout_s=5, secret=secret).send_kv("x", {}, b"\0" * 16)
        assert not ack.ok  # a well-formed frame for an unknown request is refused by the worker, which goes on
        assert await _served(router)


async def test_malformed_control_message_closes_the_link_not_the_worker() -> None:
    secret = new_secret()
    async with secured(secret) as (router, servers):
        server = servers["p0"]
        link = await FrameConnection.connect("127.0.0.1", server.control_port)
        await client_handshake(link, secret, "control")
        hello = await link.recv(idle_timeout_s=5)
        assert hello.header["type"] == "hello"
        await link.send({"type": "submit", "request": {"nonsense": True}})
        assert await _closed(link)
        assert not server._stopped.is_set()
        msgs: list[Any] = []
        again = await FrameConnection.connect("127.0.0.1", server.control_port)
        await client_handshake(again, secret, "control")
        msgs.append((await again.recv(idle_timeout_s=5)).header["type"])
        assert msgs == ["hello"]  # the worker still answers (an authenticated reconnect replaces the link)
        await again.close()
