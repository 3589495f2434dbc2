"""Retries after a worker dies: exactly-once delivery (resume after the delivered tokens), greedy and seeded
streams identical to a run without the failure, clear errors when nobody can take a request over."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest
from runtime_builders import collect, fake_deployment, pd_plan, request, run_request
from test_router_protocol import ScriptedWorker, _out, _until

from thunderserve.plan import Routing
from thunderserve.runtime.fakes import FakeEngine, RawKvCodec
from thunderserve.runtime.router import Accepted, Delta, Failed, Finished, RequestRecord, Router, RouterConfig
from thunderserve.runtime.workers.core import WorkerCore
from thunderserve.runtime.workers.protocol import GenerateRequest, WorkerConfig

pytestmark = pytest.mark.anyio
RETRY = RouterConfig(heartbeat_timeout_s=5.0, monitor_interval_s=0.05, max_retries=3)


async def _wait_for(cond, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# ---- the worker side of a retry -------------------------------------------------------------------------
def _run_core(req: GenerateRequest, engine: FakeEngine) -> list[dict[str, Any]]:
    core = WorkerCore(engine, WorkerConfig(group_id="c0", role="colocated"), RawKvCodec())
    core.submit(req)
    events: list[dict[str, Any]] = []
    while core.has_work():
        core.step()
        events += core.drain_events()
    return events + core.drain_events()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_resumed_request_continues_exactly_where_the_first_attempt_was(temperature: float) -> None:
    engine = FakeEngine(logit_spread=0.05)
    full = _run_core(request("resume me", max_tokens=20, temperature=temperature, seed=7, stop=["zz"],
                             request_id="r"), engine)
    outs = [e for e in full if e["kind"] == "output"]
    k = 8
    delivered = [t for e in outs[:k] for t in e["token_ids"]]
    chars = sum(len(e["text"]) for e in outs[:k])
    retry = dataclasses.replace(request("resume me", max_tokens=20, temperature=temperature, seed=7, stop=["zz"],
                                        request_id="r~r1"), resume_token_ids=tuple(delivered),
                                resume_text_chars=chars)
    again = _run_core(retry, engine)
    assert again[0] == {"kind": "accepted", "request_id": "r~r1", "prompt_tokens": 9, "max_tokens": 20}
    rest = [e for e in again if e["kind"] == "output"]
    assert [(e["index"], e["token_ids"], e["text"], e["finish_reason"]) for e in rest] == \
        [(e["index"], e["token_ids"], e["text"], e["finish_reason"]) for e in outs[k:]]
    assert GenerateRequest.from_dict(retry.to_dict()) == retry


# ---- router + workers in one process ---------------------------------------------------------------------
async def test_decode_worker_killed_mid_stream_every_request_finishes_exactly_once() -> None:
    plan = pd_plan(num_prefill=2, num_decode=2)
    reqs = [request(f"prompt number {i}", max_tokens=30, temperature=1.0 if i % 2 else 0.0, seed=i,
                    ignore_eos=True) for i in range(12)]
    async with fake_deployment(plan, engine_kwargs={"logit_spread": 0.05}) as dep:  # reference: no failure
        expected = [await run_request(dep.router, r) for r in reqs]
    async with fake_deployment(plan, router_config=RETRY,
                               engine_kwargs={"step_delay_s": 0.01, "logit_spread": 0.05}) as dep:
        records: list[RequestRecord] = []
        dep.router.add_observer(records.append)
        handles = [await dep.router.submit(dataclasses.replace(r, request_id=f"k{i}")) for i, r in enumerate(reqs)]
        await _wait_for(lambda: dep.servers["d1"].core.state(0).running_decode >= 3)
        await dep.servers["d1"].stop()  # dies with sequences half-decoded
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 30)
        for out, ref in zip(outs, expected, strict=True):
            assert out.terminal == ref.terminal == Finished("length", ref.terminal.prompt_tokens, 30)
            assert out.token_ids == ref.token_ids and out.text == ref.text
            deltas = [e for e in out.events if isinstance(e, Delta)]
            assert [d.index for d in deltas] == list(range(30))  # none lost, none twice
            assert sum(isinstance(e, Accepted) for e in out.events) == 1
        assert dep.router.retries_total >= 3 and sum(r.retries for r in records) == dep.router.retries_total
        assert all(r.outcome == "finished" for r in records) and dep.router.num_pending == 0


async def test_a_decode_engine_that_breaks_takes_its_worker_down_and_requests_finish_elsewhere() -> None:
    """A tensor-parallel group that loses a rank reports `broken`: the worker stops rather than failing its
    requests, so the router retries them on the other decode group (nothing reaches the client as an error)."""
    plan = pd_plan(num_prefill=1, num_decode=2)
    reqs = [request(f"broken {i}", max_tokens=20, ignore_eos=True) for i in range(8)]
    async with fake_deployment(plan, router_config=RETRY, engine_kwargs={"step_delay_s": 0.01}) as dep:
        engine = dep.engines["d1"]
        original = engine.decode

        def decode_then_break(batch):  # type: ignore[no-untyped-def]
            if len(engine.decode_calls) >= 3:
                engine.broken = "tensor-parallel rank 1 exited"  # type: ignore[attr-defined]
                raise RuntimeError("tensor-parallel group is down: rank 1 exited")
            return original(batch)

        engine.decode = decode_then_break  # type: ignore[method-assign]
        handles = [await dep.router.submit(dataclasses.replace(r, request_id=f"b{i}")) for i, r in enumerate(reqs)]
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 30)
        for i, out in enumerate(outs):
            assert out.terminal == Finished("length", out.terminal.prompt_tokens, 20)  # type: ignore[union-attr]
            assert out.token_ids == dep.engines["d0"].greedy(list(f"broken {i}".encode()), 20)
        assert dep.router.retries_total >= 1
        d1 = next(w for w in dep.router.workers() if w.group_id == "d1")
        assert not d1.alive


async def test_prefill_worker_killed_with_queued_prompts_retries_them_on_the_other() -> None:
    plan = pd_plan(num_prefill=2, num_decode=1)
    async with fake_deployment(plan, router_config=RETRY, engine_kwargs={"step_delay_s": 0.2}) as dep:
        handles = [await dep.router.submit(request(f"q{i}", max_tokens=6)) for i in range(10)]
        await _wait_for(lambda: bool(dep.engines["p1"].prefill_calls))
        await dep.servers["p1"].stop()  # dies in the middle of a prefill batch
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 30)
        for i, out in enumerate(outs):
            assert out.token_ids == dep.engines["p0"].greedy(list(f"q{i}".encode()), 6)
        assert dep.router.retries_total >= 1


async def _silence(dep: Any, group: str, n: int, max_tokens: int) -> list[Any]:
    """`n` requests decoding at `group`, which then goes silent (flush and heartbeat loops cancelled: it still
    computes, and still reads control messages, but says nothing)."""
    handles = [await dep.router.submit(request(f"s{i}", max_tokens=max_tokens)) for i in range(n)]
    await _wait_for(lambda: dep.servers[group].core.state(0).running_decode == n)
    for task in dep.servers[group]._tasks[1:]:
        task.cancel()
    return handles


async def test_a_silent_worker_is_late_and_its_requests_finish_elsewhere() -> None:
    config = RouterConfig(heartbeat_timeout_s=0.5, monitor_interval_s=0.05, max_retries=3, late_grace_s=600.0)
    async with fake_deployment(pd_plan(), router_config=config, engine_kwargs={"step_delay_s": 0.01}) as dep:
        handles = await _silence(dep, "d0", 3, 80)
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 20)
        for i, out in enumerate(outs):
            assert out.token_ids == dep.engines["p0"].greedy(list(f"s{i}".encode()), 80)
        d0 = next(w for w in dep.router.workers() if w.group_id == "d0")
        assert not d0.alive and d0.late and "no heartbeat" in d0.down_reason and dep.router.retries_total == 3
        # late, not dead: what it held is cancelled there (no orphan compute), and it is not told to stop
        await _wait_for(lambda: dep.servers["d0"].core.state(0).running_decode == 0)
        assert not dep.servers["d0"]._stopped.is_set()


async def test_a_worker_silent_past_the_late_grace_is_fenced() -> None:
    config = RouterConfig(heartbeat_timeout_s=0.3, monitor_interval_s=0.05, max_retries=3, late_grace_s=0.3)
    async with fake_deployment(pd_plan(), router_config=config, engine_kwargs={"step_delay_s": 0.01}) as dep:
        handles = await _silence(dep, "d0", 2, 40)
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 20)
        assert all(isinstance(o.terminal, Finished) for o in outs)
        await _wait_for(lambda: dep.servers["d0"]._stopped.is_set())  # declared dead and told to stop
        d0 = next(w for w in dep.router.workers() if w.group_id == "d0")
        assert not d0.alive and not d0.late and not d0.restarting and "no heartbeat" in d0.down_reason


async def test_no_live_worker_to_take_over_fails_clearly() -> None:
    async with fake_deployment(pd_plan(), router_config=RETRY, engine_kwargs={"step_delay_s": 0.02}) as dep:
        handle = await dep.router.submit(request("lonely", max_tokens=200, request_id="lonely"))
        await _wait_for(lambda: dep.router._requests["lonely"].locations == {"d0"})  # hand-off done
        await dep.servers["p0"].stop()  # the only entry group goes first ...
        await _wait_for(lambda: not dep.router.entry_groups())
        await dep.servers["d0"].stop()  # ... then the decode worker holding the request
        out = await asyncio.wait_for(collect(handle), 10)
        term = out.terminal
        assert isinstance(term, Failed) and term.status == 503 and term.code == "worker_failed"
        assert "worker 'd0'" in term.message and "no live worker can take the request over" in term.message
        assert 0 < len(out.token_ids) < 200 and dep.router.num_pending == 0


async def test_remove_group_drains_then_stops_the_worker() -> None:
    plan = pd_plan(num_prefill=1, num_decode=2)
    async with fake_deployment(plan, router_config=RETRY, engine_kwargs={"step_delay_s": 0.01}) as dep:
        await dep.router.update_routing(Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 0.5, "d1": 0.5}}))
        handles = [await dep.router.submit(request(f"r{i}", max_tokens=25)) for i in range(6)]
        await _wait_for(lambda: dep.servers["d1"].core.state(0).running_decode >= 1)
        await dep.router.update_routing(Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}}))
        await dep.router.remove_group("d1", drain_timeout_s=10.0)
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 10)
        assert all(isinstance(o.terminal, Finished) and len(o.token_ids) == 25 for o in outs)
        assert dep.router.retries_total == 0  # drained, nothing had to be retried
        d1 = next(w for w in dep.router.workers() if w.group_id == "d1")
        assert not d1.alive and not d1.in_plan and "removed" in d1.down_reason
        assert [g.id for g in dep.router.plan.groups] == ["p0", "d0"]
        await _wait_for(lambda: dep.servers["d1"]._stopped.is_set())  # the worker was told to shut down
        await dep.router.remove_group("d1")  # idempotent
        out = await run_request(dep.router, request("after", max_tokens=5))
        assert isinstance(out.terminal, Finished)


# ---- the router against scripted workers ---------------------------------------------------------------
async def _setup(n_prefill: int = 2) -> tuple[Router, list[ScriptedWorker], ScriptedWorker]:
    ps = [ScriptedWorker(f"p{i}", "prefill") for i in range(n_prefill)]
    d0 = ScriptedWorker("d0", "decode")
    addrs = {w.group: ("127.0.0.1", await w.server.start()) for w in [*ps, d0]}
    router = Router(pd_plan(num_prefill=n_prefill), addrs, RouterConfig(monitor_interval_s=0.05, max_retries=2))
    await router.start()
    await asyncio.wait_for(asyncio.gather(*[w.connected.wait() for w in [*ps, d0]]), 5)
    return router, ps, d0


def _submits(w: ScriptedWorker) -> list[dict[str, Any]]:
    return [m["request"] for m in w.received if m["type"] == "submit"]


async def test_retry_resumes_after_delivered_tokens_and_drops_duplicates_and_stale_attempts() -> None:
    router, (p0, p1), d0 = await _setup()
    try:
        handle = await router.submit(request("x", max_tokens=5, request_id="r1"))
        await _until(lambda: _submits(p0) or _submits(p1))
        first = p0 if _submits(p0) else p1
        other = p1 if first is p0 else p0
        await first.events({"kind": "accepted", "request_id": "r1", "prompt_tokens": 1, "max_tokens": 5},
                           _out("r1", 0, 10, "a"), {"kind": "handoff", "request_id": "r1", "to": "d0",
                                                    "state": "start"},
                           {"kind": "handoff", "request_id": "r1", "to": "d0", "state": "done"})
        await d0.events(_out("r1", 1, 11, "bb"))
        await _until(lambda: router._requests["r1"].next_index == 2)
        await d0.server.close()  # the decode worker dies holding r1
        assert d0.conn is not None
        await d0.conn.close()
        await _until(lambda: any(s["request_id"] == "r1~r1" for w in (p0, p1) for s in _submits(w)))
        retry_at = next(w for w in (p0, p1) if any(s["request_id"] == "r1~r1" for s in _submits(w)))
        sub = next(s for s in _submits(retry_at) if s["request_id"] == "r1~r1")
        assert sub["resume_token_ids"] == [10, 11] and sub["resume_text_chars"] == 3 and sub["max_tokens"] == 5
        await retry_at.events(
            {"kind": "accepted", "request_id": "r1~r1", "prompt_tokens": 1, "max_tokens": 5},
            _out("r1~r1", 1, 99, "dup"),  # an index already delivered: dropped
            _out("r1~r1", 2, 12, "c"), _out("r1~r1", 3, 13, "d"))
        await other.events(_out("r1", 3, 66, "stale"))  # the dead attempt's id: ignored, and cancelled
        await retry_at.events(_out("r1~r1", 4, 14, "e", "length"))
        out = await asyncio.wait_for(collect(handle), 5)
        assert out.events == [Accepted(1, 5), Delta("a", (10,), 0), Delta("bb", (11,), 1), Delta("c", (12,), 2),
                              Delta("d", (13,), 3), Delta("e", (14,), 4), Finished("length", 1, 5)]
        await _until(lambda: any(m["type"] == "cancel" and m["request_id"] == "r1" for m in other.received))
        assert router.retries_total == 1
    finally:
        await router.close()
        for w in (p0, p1):
            await w.server.close()


async def test_kv_transfer_failure_is_retried_and_retries_are_bounded() -> None:
    router, (p0,), d0 = await _setup(n_prefill=1)
    try:
        handle = await router.submit(request("x", max_tokens=4, request_id="r1"))
        for attempt in ("r1", "r1~r1", "r1~r2"):
            await _until(lambda a=attempt: any(s["request_id"] == a for s in _submits(p0)))
            await p0.events({"kind": "accepted", "request_id": attempt, "prompt_tokens": 1, "max_tokens": 4},
                            {"kind": "error", "request_id": attempt, "code": "kv_transfer_failed",
                             "message": "KV transfer from p0 to d0 failed: connection reset"})
        term = (await asyncio.wait_for(collect(handle), 5)).terminal
        assert isinstance(term, Failed) and term.code == "worker_failed"
        assert "KV transfer from p0 to d0 failed" in term.message and "gave up after 2 retries" in term.message
        h2 = await router.submit(request("y", request_id="r2"))
        await _until(lambda: any(s["request_id"] == "r2" for s in _submits(p0)))
        await p0.events({"kind": "error", "request_id": "r2", "message": "prefill failed: out of memory"})
        term = (await asyncio.wait_for(collect(h2), 5)).terminal
        assert term == Failed(503, "prefill failed: out of memory", code="worker_error")  # not retried
    finally:
        await router.close()
        await p0.server.close()
        await d0.server.close()
