"""VllmRouter over fake group clients: P/D routing, exactly-once retries, flips, removal, errors, metrics."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest

from thunderserve.plan.model import Group, Phase, Plan, Routing, Stage
from thunderserve.runtime.engine.base import SamplingParams
from thunderserve.runtime.fakes import fake_next_token
from thunderserve.runtime.router import Accepted, Delta, Failed, Finished, RequestRecord
from thunderserve.runtime.vllm.fake import FakeGroupClient
from thunderserve.runtime.vllm.metrics import InstanceMetricsCollector
from thunderserve.runtime.vllm.router import VllmRouter, VllmRouterConfig
from thunderserve.runtime.workers.protocol import GenerateRequest


def make_plan(prefill: int = 1, decode: int = 1) -> Plan:
    def g(gid: str, phase: Phase, i: int) -> Group:
        return Group(id=gid, phase=phase, stages=(Stage(gpus=(f"n:{i}",), layers=(0, 2)),))

    ps = [f"p{i}" for i in range(prefill)]
    ds = [f"d{i}" for i in range(decode)]
    groups = tuple(g(x, Phase.PREFILL, i) for i, x in enumerate(ps)) + tuple(
        g(x, Phase.DECODE, prefill + i) for i, x in enumerate(ds))
    return Plan(model="m", cluster="c", groups=groups,
                routing=Routing(entry={p: 1 / prefill for p in ps}, kv={p: {d: 1 / decode for d in ds} for p in ps}))


def request(rid: str, prompt: str = "hello", max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(request_id=rid, sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0), seed=0,
                           prompt=prompt, max_tokens=max_tokens)


def expected(prompt: str, n: int) -> list[int]:
    ctx = list(prompt.encode())
    out = []
    for _ in range(n):
        t = fake_next_token(ctx)
        ctx.append(t)
        out.append(t)
    return out


async def collect(router: VllmRouter, req: GenerateRequest) -> tuple[list[int], list[object]]:
    handle = await router.submit(req)
    ids: list[int] = []
    events: list[object] = []
    async for ev in handle:
        events.append(ev)
        if isinstance(ev, Delta):
            assert ev.index == len(ids)  # in order, each index once
            ids.extend(ev.token_ids)
    return ids, events


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def make_router(plan: Plan, clients: dict[str, FakeGroupClient], **kw: object) -> VllmRouter:
    cfg = VllmRouterConfig(health_interval_s=0.01, health_failures=1, metrics_interval_s=0.01, max_context_tokens=512,
                           **kw)  # type: ignore[arg-type]
    return VllmRouter(plan, clients, cfg)  # type: ignore[arg-type]


def test_prefill_on_prefill_group_decode_on_decode_group_with_its_kv() -> None:
    p, d = FakeGroupClient("p0"), FakeGroupClient("d0")

    async def main() -> tuple[list[int], list[object]]:
        router = make_router(make_plan(), {"p0": p, "d0": d})
        await router.start()
        try:
            return await collect(router, request("a"))
        finally:
            await router.close()

    ids, events = run(main())  # type: ignore[misc]
    assert ids == expected("hello", 8)
    assert isinstance(events[0], Accepted) and events[0].prompt_tokens == 5
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 8
    assert p.calls == ["tokenize", "prefill"] and d.calls == ["generate"] and d.decodes_from_kv == 1


def test_decode_instance_killed_mid_stream_loses_nothing() -> None:
    p, d = FakeGroupClient("p0"), FakeGroupClient("d0", die_after_tokens=3)
    records: list[RequestRecord] = []

    async def main() -> tuple[list[int], list[object]]:
        router = make_router(make_plan(), {"p0": p, "d0": d})
        router.add_observer(records.append)
        await router.start()
        try:
            out = await collect(router, request("a", max_tokens=10))
            assert [w.alive for w in router.workers()] == [False, True]  # d0 left the routing
            return out
        finally:
            await router.close()

    ids, events = run(main())  # type: ignore[misc]
    assert ids == expected("hello", 10)  # exactly once: no token lost or repeated
    assert isinstance(events[-1], Finished)
    assert p.prefills == 1 and "generate" in p.calls  # the rest was decoded at the prefill group (kv_both)
    assert records[0].outcome == "finished" and records[0].retries == 1


def test_prefill_rerun_on_another_decode_group_when_kv_is_lost() -> None:
    p, d0, d1 = FakeGroupClient("p0"), FakeGroupClient("d0", die_after_tokens=2), FakeGroupClient("d1")

    async def main() -> list[int]:
        router = make_router(make_plan(1, 2), {"p0": p, "d0": d0, "d1": d1})
        await router.start()
        try:
            ids: list[int] = []
            for i in range(2):
                got, ev = await collect(router, request(f"r{i}", max_tokens=6))
                assert isinstance(ev[-1], Finished)
                ids = got
            return ids
        finally:
            await router.close()

    assert run(main()) == expected("hello", 6)
    assert p.prefills == 3  # two requests, plus a re-run prefill (prompt + delivered) after d0 died
    assert d1.decodes_from_kv == 2


def test_retries_exhausted_fails_with_openai_error() -> None:
    p, d = FakeGroupClient("p0"), FakeGroupClient("d0", die_after_tokens=1)

    async def main() -> list[object]:
        router = make_router(make_plan(), {"p0": p, "d0": d}, max_retries=0)
        await router.start()
        try:
            return (await collect(router, request("a")))[1]
        finally:
            await router.close()

    events = run(main())
    assert isinstance(events[-1], Failed) and events[-1].status == 503  # type: ignore[index]
    assert "d0" in events[-1].message and events[-1].code == "worker_failed"  # type: ignore[index]


def test_instance_rejection_reaches_client_as_400() -> None:
    async def main() -> list[object]:
        router = make_router(make_plan(), {"p0": FakeGroupClient("p0"), "d0": FakeGroupClient("d0")})
        await router.start()
        try:
            return (await collect(router, request("a", prompt="")))[1]
        finally:
            await router.close()

    (ev,) = run(main())  # type: ignore[misc]
    assert isinstance(ev, Failed) and ev.status == 400 and ev.param == "prompt"
    assert ev.error_type == "invalid_request_error"


def test_flip_is_routing_only() -> None:
    p, d = FakeGroupClient("p0"), FakeGroupClient("d0")

    async def main() -> None:
        router = make_router(make_plan(), {"p0": p, "d0": d})
        await router.start()
        try:
            await router.set_role("p0", Phase.COLOCATED)
            ids, _ = await collect(router, request("a", max_tokens=4))
            assert ids == expected("hello", 4)
            assert router.plan.group("p0").phase is Phase.COLOCATED
        finally:
            await router.close()

    run(main())
    assert d.calls == [] and p.prefills == 0 and p.calls == ["tokenize", "generate"]


def test_health_poll_takes_dead_group_out_and_remove_group_stops_it() -> None:
    p, d0, d1 = FakeGroupClient("p0"), FakeGroupClient("d0"), FakeGroupClient("d1")
    removed: list[str] = []

    async def main() -> VllmRouter:
        cfg = VllmRouterConfig(health_interval_s=0.01, health_failures=1, metrics_interval_s=0.01,
                               max_context_tokens=512)
        router = VllmRouter(make_plan(1, 2), {"p0": p, "d0": d0, "d1": d1}, cfg,  # type: ignore[dict-item]
                            on_remove=removed.append)
        await router.start()
        try:
            d0.die()
            await asyncio.sleep(0.1)
            assert {w.group_id: w.alive for w in router.workers()} == {"d0": False, "d1": True, "p0": True}
            await router.remove_group("d1")
            return router
        finally:
            await router.close()

    router = run(main())
    assert removed == ["d1"]
    assert sorted(g.id for g in router.plan.groups) == ["d0", "p0"]  # type: ignore[attr-defined]
    assert router.plan.routing.kv == {"p0": {"d0": 0.5}}  # type: ignore[attr-defined]


def test_instance_metrics_are_relabelled_by_group() -> None:
    p, d = FakeGroupClient("p0"), FakeGroupClient("d0")

    async def main() -> bytes:
        router = make_router(make_plan(), {"p0": p, "d0": d})
        await router.start()
        try:
            await collect(router, request("a", max_tokens=3))
            await asyncio.sleep(0.05)
            registry = CollectorRegistry()
            registry.register(InstanceMetricsCollector(router.instance_metrics))
            return generate_latest(registry)
        finally:
            await router.close()

    text = run(main()).decode()  # type: ignore[attr-defined]
    assert 'fake_generated_tokens_total{group="d0"} 3.0' in text
    assert 'fake_generated_tokens_total{group="p0"} 0.0' in text
