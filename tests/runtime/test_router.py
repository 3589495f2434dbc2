"""Router + worker servers in one process (fake engines, real TCP): routing, live control, failures."""

from __future__ import annotations

import asyncio

import pytest
from runtime_builders import collect, fake_deployment, pd_plan, request, run_request

from thunderserve.plan import Phase, Routing
from thunderserve.runtime.router import Failed, Finished, RequestRecord, RouterConfig

pytestmark = pytest.mark.anyio


async def _wait_for(cond, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_disaggregated_greedy_matches_the_model_and_ships_kv() -> None:
    async with fake_deployment(pd_plan()) as dep:
        records: list[RequestRecord] = []
        dep.router.add_observer(records.append)
        outs = await asyncio.gather(*[run_request(dep.router, request(f"prompt {i}", max_tokens=10))
                                      for i in range(6)])
        for i, out in enumerate(outs):
            assert out.token_ids == dep.engines["p0"].greedy(list(f"prompt {i}".encode()), 10)
            assert out.terminal == Finished("length", len(f"prompt {i}"), 10)
        assert dep.engines["p0"].decode_calls == [] and sum(dep.engines["d0"].decode_calls) == 6 * 9
        await _wait_for(lambda: (dep.router.workers()[1].state or None) is not None
                        and dep.router.workers()[1].state.kv_bytes_sent.get("d0", 0) > 0)
        assert [r.outcome for r in records] == ["finished"] * 6 and all(r.ttft_s >= 0 for r in records)
        assert dep.router.num_pending == 0


async def test_entry_shares_split_requests() -> None:
    plan = pd_plan(num_prefill=2, entry={"p0": 0.75, "p1": 0.25})
    async with fake_deployment(plan) as dep:
        for i in range(8):
            await run_request(dep.router, request(f"r{i}", max_tokens=2))
        assert (len(dep.engines["p0"].prefill_calls), len(dep.engines["p1"].prefill_calls)) == (6, 2)


async def test_role_flip_and_routing_update_live_without_reload() -> None:
    plan = pd_plan(num_prefill=1, num_decode=2, kv={"p0": {"d0": 1.0, "d1": 0.0}})
    async with fake_deployment(plan) as dep:
        tokens_before = {w.group_id: w.weights_token for w in dep.router.workers()}
        await run_request(dep.router, request("a", max_tokens=4))
        assert dep.engines["d0"].decode_calls and not dep.engines["d1"].decode_calls
        await dep.router.update_routing(Routing(entry={"p0": 1.0}, kv={"p0": {"d1": 1.0}}))
        await asyncio.sleep(0.05)
        calls_d0 = len(dep.engines["d0"].decode_calls)
        out = await run_request(dep.router, request("b", max_tokens=4))
        assert isinstance(out.terminal, Finished)
        assert dep.engines["d1"].decode_calls and len(dep.engines["d0"].decode_calls) == calls_d0
        # d1 becomes colocated and takes requests itself; p0 becomes a decode worker
        await dep.router.set_role("d1", Phase.COLOCATED)
        await dep.router.set_role("p0", Phase.DECODE)
        await dep.router.update_routing(Routing(entry={"d1": 1.0}, kv={}))
        prefills_d1 = len(dep.engines["d1"].prefill_calls)
        out = await run_request(dep.router, request("c", max_tokens=4))
        assert out.token_ids == dep.engines["d1"].greedy(list(b"c"), 4)
        assert len(dep.engines["d1"].prefill_calls) == prefills_d1 + 1
        await _wait_for(lambda: {w.group_id: w.state.role for w in dep.router.workers() if w.state}
                        == {"p0": "decode", "d0": "decode", "d1": "colocated"})
        assert {w.group_id: w.weights_token for w in dep.router.workers()} == tokens_before
        assert {g: s.core.engine.weights_token for g, s in dep.servers.items()} == tokens_before
        assert dep.router.plan.group("d1").phase is Phase.COLOCATED
        assert dep.router.plan.routing == Routing(entry={"d1": 1.0}, kv={})


async def test_dead_decode_worker_fails_its_requests_clearly_then_prefill_decodes_locally() -> None:
    async with fake_deployment(pd_plan(), engine_kwargs={"step_delay_s": 0.02}) as dep:
        handles = [await dep.router.submit(request(f"long {i}", max_tokens=200)) for i in range(3)]
        await _wait_for(lambda: dep.servers["d0"].core.state(0).running_decode == 3)
        # p0 releases a request when its KV hand-off is acknowledged, which may trail d0's first decode step
        await _wait_for(lambda: {w.group_id: w.held_requests for w in dep.router.workers()} == {"p0": 0, "d0": 3})
        flying = dep.router.in_flight()  # what the workload monitor sees of unfinished requests
        assert sorted(flying) == sorted(h.request_id for h in handles)
        assert all(f.prompt_tokens == len(f"long {i}") for i, f in enumerate(flying[h.request_id] for h in handles))
        assert all(1 <= f.completion_tokens < 200 for f in flying.values())
        await dep.servers["d0"].stop()  # the worker dies (its sockets close)
        outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 5)
        for out in outs:
            term = out.terminal
            assert isinstance(term, Failed) and term.status == 503 and term.code == "worker_failed"
            assert "worker 'd0'" in term.message and "is down" in term.message
        assert dep.router.num_pending == 0
        d0 = next(w for w in dep.router.workers() if w.group_id == "d0")
        assert not d0.alive and "connection lost" in d0.down_reason
        out = await run_request(dep.router, request("after", max_tokens=5))  # p0 keeps the cache itself
        assert out.token_ids == dep.engines["p0"].greedy(list(b"after"), 5)


async def test_dead_entry_worker_means_503_not_a_hang() -> None:
    async with fake_deployment(pd_plan()) as dep:
        await dep.servers["p0"].stop()
        await _wait_for(lambda: not dep.router.entry_groups())
        out = await run_request(dep.router, request("x"))
        assert isinstance(out.terminal, Failed) and out.terminal.code == "no_worker"


async def test_silent_worker_is_declared_dead_by_heartbeat_timeout() -> None:
    config = RouterConfig(heartbeat_timeout_s=0.4, monitor_interval_s=0.05)
    async with fake_deployment(pd_plan(), router_config=config, engine_kwargs={"step_delay_s": 1.5},
                               worker_kwargs={"heartbeat_interval_s": 30.0}) as dep:
        handle = await dep.router.submit(request("stuck", max_tokens=3))
        out = await asyncio.wait_for(collect(handle), 5)
        assert isinstance(out.terminal, Failed) and "no heartbeat" in out.terminal.message


async def test_backpressure_and_cancel() -> None:
    async with fake_deployment(pd_plan(), worker_kwargs={"kv_capacity_tokens": 40}) as dep:
        outs = await asyncio.gather(*[run_request(dep.router, request("0123456789", max_tokens=15))
                                      for _ in range(5)])
        assert all(isinstance(o.terminal, Finished) and len(o.token_ids) == 15 for o in outs)
        assert max(dep.engines["d0"].decode_calls) == 1  # 25-token reservations: one at a time in 40
    async with fake_deployment(pd_plan(), engine_kwargs={"step_delay_s": 0.02}) as dep:
        handle = await dep.router.submit(request("bye", max_tokens=400))
        await _wait_for(lambda: dep.servers["d0"].core.state(0).running_decode == 1)
        await dep.router.cancel(handle.request_id)
        await _wait_for(lambda: dep.servers["d0"].core.state(0).running_decode == 0)
        assert dep.router.num_pending == 0


async def test_rejections_and_overload() -> None:
    config = RouterConfig(max_pending_requests=1, monitor_interval_s=0.05)
    async with fake_deployment(pd_plan(), router_config=config, engine_kwargs={"step_delay_s": 0.05}) as dep:
        bad = await run_request(dep.router, request("x" * 600, max_tokens=5))
        assert isinstance(bad.terminal, Failed) and bad.terminal.status == 400
        assert bad.terminal.code == "context_length_exceeded"
        first = await dep.router.submit(request("a", max_tokens=3))
        second = await run_request(dep.router, request("b", max_tokens=3))
        assert isinstance(second.terminal, Failed) and second.terminal.code == "overloaded"
        assert isinstance((await collect(first)).terminal, Finished)


async def test_rebalanced_routing_moves_unstarted_requests_exactly_once() -> None:
    """p0 builds a prefill backlog; the routing moves entry to p1 with rebalance: p0 hands back what it has
    not started, the router routes it to p1, and every request finishes once with the model's tokens."""
    plan = pd_plan(num_prefill=2, entry={"p0": 1.0, "p1": 0.0})
    async with fake_deployment(plan, engine_kwargs={"step_delay_s": 0.05},
                               worker_kwargs={"prefill_token_budget": 8}) as dep:
        records: list[RequestRecord] = []
        dep.router.add_observer(records.append)
        prompts = [f"queued {i}" for i in range(8)]
        handles = [await dep.router.submit(request(p, max_tokens=4)) for p in prompts]
        await _wait_for(lambda: dep.servers["p0"].core.state(0).queued_prefill >= 4)
        await dep.router.update_routing(Routing(entry={"p1": 1.0}, kv={"p0": {"d0": 1.0}, "p1": {"d0": 1.0}}),
                                        rebalance=True)
        outs = [await collect(h) for h in handles]
        for p, out in zip(prompts, outs, strict=True):
            assert out.terminal == Finished("length", len(p), 4)
            assert out.token_ids == dep.engines["p0"].greedy(list(p.encode()), 4)
        moved = dep.router.moved_total
        assert moved >= 3 and sum(dep.engines["p1"].prefill_calls) == moved  # p1 prefilled exactly those
        assert sum(dep.engines["p0"].prefill_calls) + moved == len(prompts)  # nothing prefilled twice
        assert sorted(r.outcome for r in records) == ["finished"] * 8 and all(r.retries == 0 for r in records)
        assert dep.router.num_pending == 0


async def test_a_burst_of_prompts_is_prefilled_as_one_batch() -> None:
    """Control messages that arrive while a step runs are all taken in before the next step (not one per step),
    so prompts that arrive together share a prefill batch."""
    async with fake_deployment(pd_plan(), engine_kwargs={"step_delay_s": 0.3}) as dep:
        first = await dep.router.submit(request("warm", max_tokens=2))
        await _wait_for(lambda: bool(dep.engines["p0"].prefill_calls))  # p0 is inside a slow step now
        burst = await asyncio.gather(*[dep.router.submit(request(f"burst {i}", max_tokens=2)) for i in range(6)])
        outs = [await collect(h) for h in [first, *burst]]
        assert all(isinstance(o.terminal, Finished) for o in outs)
        calls = dep.engines["p0"].prefill_calls[1:]
        assert sum(calls) == 6 and len(calls) <= 2  # one batch (two if the burst straddled a step's end)
