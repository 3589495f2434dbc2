"""Router against scripted workers speaking the wire protocol: ordering, late events, hand-off edge cases."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from runtime_builders import collect, pd_plan, request

from thunderserve.runtime.kv.transport import FrameConnection, FrameServer
from thunderserve.runtime.router import Accepted, Delta, Failed, Finished, Router, RouterConfig

pytestmark = pytest.mark.anyio


class ScriptedWorker:
    """Says hello, records control messages, and sends whatever events the test pushes."""

    def __init__(self, group: str, role: str) -> None:
        self.group = group
        self.role = role
        self.received: list[dict[str, Any]] = []
        self.conn: FrameConnection | None = None
        self.server = FrameServer(self._serve)
        self.connected = asyncio.Event()

    async def _serve(self, conn: FrameConnection) -> None:
        self.conn = conn
        await conn.send({"type": "hello", "group": self.group, "pid": 4242, "role": self.role,
                         "weights_token": 7, "host": "127.0.0.1", "kv_port": 1, "max_context_tokens": 100})
        self.connected.set()
        while True:
            self.received.append((await conn.recv()).header)

    async def events(self, *events: dict[str, Any]) -> None:
        assert self.conn is not None
        await self.conn.send({"type": "events", "events": list(events)})

    def submitted(self) -> list[str]:
        return [m["request"]["request_id"] for m in self.received if m["type"] == "submit"]


async def _setup(config: RouterConfig | None = None) -> tuple[Router, ScriptedWorker, ScriptedWorker]:
    p0, d0 = ScriptedWorker("p0", "prefill"), ScriptedWorker("d0", "decode")
    addrs = {"p0": ("127.0.0.1", await p0.server.start()), "d0": ("127.0.0.1", await d0.server.start())}
    router = Router(pd_plan(), addrs, config or RouterConfig(monitor_interval_s=0.05))
    await router.start()
    await asyncio.wait_for(asyncio.gather(p0.connected.wait(), d0.connected.wait()), 5)
    return router, p0, d0


async def _until(cond) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def _out(rid: str, index: int, tok: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"kind": "output", "request_id": rid, "index": index, "token_ids": [tok], "text": text,
            "finish_reason": finish}


async def test_configure_then_out_of_order_tokens_are_delivered_in_order() -> None:
    router, p0, d0 = await _setup()
    try:
        await _until(lambda: p0.received and d0.received)
        conf = p0.received[0]
        assert conf["type"] == "configure" and conf["role"] == "prefill" and conf["kv_shares"] == {"d0": 1.0}
        assert conf["peers"] == {"d0": ["127.0.0.1", 1], "p0": ["127.0.0.1", 1]}
        handle = await router.submit(request("x", max_tokens=3, request_id="r1"))
        await _until(lambda: p0.submitted() == ["r1"])
        await p0.events({"kind": "accepted", "request_id": "r1", "prompt_tokens": 1, "max_tokens": 3},
                        {"kind": "handoff", "request_id": "r1", "to": "d0", "state": "start"})
        await d0.events(_out("r1", 2, 12, "c", "length"), _out("r1", 1, 11, "b"))  # decode side is faster
        await asyncio.sleep(0.05)
        await p0.events(_out("r1", 0, 10, "a"), {"kind": "handoff", "request_id": "r1", "to": "d0",
                                                 "state": "done"})
        out = await asyncio.wait_for(collect(handle), 5)
        assert out.events == [Accepted(1, 3), Delta("a", (10,), 0), Delta("b", (11,), 1), Delta("c", (12,), 2),
                              Finished("length", 1, 3)]
        await d0.events(_out("r1", 3, 13, "late"))  # late event after the end: ignored
        await asyncio.sleep(0.05)
        assert router.num_pending == 0
    finally:
        await router.close()
        await p0.server.close()
        await d0.server.close()


async def test_handoff_to_a_dead_group_and_worker_errors_fail_clearly() -> None:
    router, p0, d0 = await _setup()
    try:
        handle = await router.submit(request("x", request_id="r1"))
        await _until(lambda: p0.submitted() == ["r1"])
        await d0.server.close()  # the decode worker goes away
        await _until(lambda: not next(w for w in router.workers() if w.group_id == "d0").alive)
        await _until(lambda: any(m["type"] == "set_routing" and m.get("down") == ["d0"] for m in p0.received))
        await p0.events({"kind": "accepted", "request_id": "r1", "prompt_tokens": 1, "max_tokens": 16},
                        _out("r1", 0, 10, "a"), {"kind": "handoff", "request_id": "r1", "to": "d0", "state": "start"})
        out = await asyncio.wait_for(collect(handle), 5)
        assert isinstance(out.terminal, Failed) and "decode worker 'd0' is down" in out.terminal.message
        await _until(lambda: any(m["type"] == "cancel" and m["request_id"] == "r1" for m in p0.received))

        h2 = await router.submit(request("y", request_id="r2"))
        await _until(lambda: "r2" in p0.submitted())
        await p0.events({"kind": "error", "request_id": "r2", "message": "prefill failed: out of memory"})
        term = (await asyncio.wait_for(collect(h2), 5)).terminal
        assert term == Failed(503, "prefill failed: out of memory", code="worker_error")
    finally:
        await router.close()
        await p0.server.close()


async def test_request_timeout_and_shutdown_fail_pending_requests() -> None:
    router, p0, d0 = await _setup(RouterConfig(request_timeout_s=0.2, monitor_interval_s=0.05))
    try:
        out = await asyncio.wait_for(collect(await router.submit(request("x", request_id="r1"))), 5)
        assert isinstance(out.terminal, Failed) and out.terminal.status == 504
        pending = await router.submit(request("y", request_id="r2"))
    finally:
        await router.close(shutdown_workers=True)
        await p0.server.close()
        await d0.server.close()
    term = (await asyncio.wait_for(collect(pending), 5)).terminal
    assert isinstance(term, Failed) and term.code == "shutting_down"
    assert any(m["type"] == "shutdown" for m in p0.received)
