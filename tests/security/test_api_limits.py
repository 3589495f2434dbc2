"""Limits checked before work, over a fake deployment in process: each hostile or unlucky body gets a clear
4xx, nothing reaches a worker it should not, and the router keeps no state (its pending gauge returns to 0)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from runtime_builders import fake_deployment, pd_plan, request

from thunderserve.runtime.api import ApiConfig, create_app
from thunderserve.runtime.api.limits import RequestLimits
from thunderserve.runtime.router import Failed, RouterConfig
from thunderserve.runtime.workers.sampling import TextStream

pytestmark = pytest.mark.anyio
JSON = {"content-type": "application/json"}


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ts")


def _pending(app: Any) -> float:
    text = app.state.metrics.render().decode()
    line = next(x for x in text.splitlines() if x.startswith("thunderserve_router_pending_requests "))
    return float(line.split()[1])


async def _settled(app: Any) -> float:
    """The pending gauge once in-flight cancellations have landed (bounded wait, not a timing assertion)."""
    for _ in range(200):
        if _pending(app) == 0:
            break
        await asyncio.sleep(0.01)
    return _pending(app)


def _nested(depth: int) -> Any:
    v: Any = []
    for _ in range(depth):
        v = [v]
    return v


CASES: list[tuple[str, bytes, int, str | None]] = [
    ("not json", b"{nope", 400, "invalid_json"),
    ("deeply nested", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("nested past the depth limit", json.dumps({"model": "toy", "prompt": "a", "x": _nested(40)}).encode(), 400,
     "invalid_json"),
    ("lone surrogate", b'{"model": "toy", "prompt": "ab\\ud800cd", "max_tokens": 2}', 400, "invalid_value"),
    ("surrogate in a chat message", b'{"model": "toy", "messages": [{"role": "user", "content": "\\udfff"}]}',
     400, "invalid_value"),
    ("content null", json.dumps({"model": "toy", "messages": [{"role": "user", "content": None}]}).encode(),
     422, "invalid_type"),
    ("prompt longer than any context", json.dumps({"model": "toy", "prompt": "x" * 20_000}).encode(), 400,
     "context_length_exceeded"),
    ("token ids longer than the context", json.dumps({"model": "toy", "prompt": [1] * 600}).encode(), 400,
     "context_length_exceeded"),
    ("max_tokens past the context", json.dumps({"model": "toy", "prompt": "a", "max_tokens": 512}).encode(), 400,
     "context_length_exceeded"),
    ("chat max_tokens past the context", json.dumps({"model": "toy", "max_tokens": 10**9, "messages": [
        {"role": "user", "content": "a"}]}).encode(), 400, "context_length_exceeded"),
    ("prompt too long after tokenising", json.dumps({"model": "toy", "prompt": "y" * 600}).encode(), 400,
     "context_length_exceeded"),
]


@pytest.mark.parametrize(("name", "body", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_bad_bodies_get_clear_errors_and_leave_no_state(name: str, body: bytes, status: int,
                                                              code: str | None) -> None:
    async with fake_deployment(pd_plan()) as dep:
        app = create_app(dep.router, ApiConfig("toy"))
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        async with _client(app) as http:
            r = await http.post(path, content=body, headers=JSON)
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert err["code"] == code and err["message"] and "Traceback" not in r.text
            assert await _settled(app) == 0
            ok = await http.post("/v1/completions", json={"model": "toy", "prompt": "fine", "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


async def test_text_over_the_context_bound_is_refused_before_tokenising() -> None:
    async with fake_deployment(pd_plan()) as dep:
        seen: list[int] = []
        engine = dep.engines["p0"]
        real_encode = engine.encode
        engine.encode = lambda text: seen.append(len(text)) or real_encode(text)  # type: ignore[method-assign]
        app = create_app(dep.router, ApiConfig("toy", limits=RequestLimits(max_chars_per_token=1)))
        async with _client(app) as http:
            r = await http.post("/v1/completions", json={"model": "toy", "prompt": "z" * 513})
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            assert seen == []  # never tokenised
            r = await http.post("/v1/completions", json={"model": "toy", "prompt": "z" * 8, "max_tokens": 2})
            assert r.status_code == 200 and seen == [8]


async def test_body_over_the_limit_is_413_whether_declared_or_streamed() -> None:
    async with fake_deployment(pd_plan()) as dep:
        app = create_app(dep.router, ApiConfig("toy", limits=RequestLimits(max_body_bytes=4096)))
        big = json.dumps({"model": "toy", "prompt": "a" * 5000}).encode()
        async with _client(app) as http:
            r = await http.post("/v1/completions", content=big, headers=JSON)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

            async def chunks() -> Any:  # no Content-Length: the cap applies while reading
                for i in range(0, len(big), 1000):
                    yield big[i:i + 1000]

            r = await http.post("/v1/completions", content=chunks(), headers=JSON)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            assert await _settled(app) == 0


async def test_a_request_too_large_for_a_worker_frame_is_refused_without_a_leak() -> None:
    async with fake_deployment(pd_plan()) as dep:
        handle = await dep.router.submit(request(prompt="q" * (17 * 1024 * 1024)))
        ev = await handle.next()
        assert isinstance(ev, Failed) and ev.status == 413 and ev.code == "request_too_large"
        assert dep.router.num_pending == 0 and dep.router.workers()[0].alive


@pytest.mark.parametrize(("param", "value"), [
    ("logprobs", True), ("top_logprobs", 3), ("logit_bias", {"50": 10}), ("tools", [{"type": "function"}]),
    ("tool_choice", "auto"), ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5),
    ("frequency_penalty", -1.0), ("best_of", 2)])
async def test_unsupported_openai_parameters_are_refused_not_ignored(param: str, value: Any) -> None:
    async with fake_deployment(pd_plan()) as dep:
        app = create_app(dep.router, ApiConfig("toy"))
        chat = {"model": "toy", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        async with _client(app) as http:
            for path, body in (("/v1/chat/completions", chat),
                               ("/v1/completions", {"model": "toy", "prompt": "hi", "max_tokens": 2})):
                r = await http.post(path, json={**body, param: value})
                assert r.status_code == 400, r.text
                assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "unsupported_parameter"
            # the values that mean "not used" are accepted (clients send them by default)
            unused = {"logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": None,
                      "tools": [], "response_format": {"type": "text"}, "best_of": 1}
            r = await http.post("/v1/chat/completions", json={**chat, **unused})
            assert r.status_code == 200, r.text
            assert _pending(app) == 0


async def test_full_queue_answers_429_with_retry_after_and_recovers() -> None:
    config = RouterConfig(max_queued_requests=2, monitor_interval_s=0.05)
    async with fake_deployment(pd_plan(), router_config=config, engine_kwargs={"step_delay_s": 0.3}) as dep:
        app = create_app(dep.router, ApiConfig("toy"))
        async with _client(app) as http:
            body = {"model": "toy", "prompt": "wait", "max_tokens": 2}
            first = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(2)]
            while dep.router.num_queued < 2:
                await asyncio.sleep(0.005)
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
            assert [x.status_code for x in await asyncio.gather(*first)] == [200, 200]
            assert await _settled(app) == 0
            assert (await http.post("/v1/completions", json=body)).status_code == 200


async def _asgi_call(app: Any, path: str, body: dict[str, Any], disconnect: asyncio.Event) -> list[dict[str, Any]]:
    """Drive the app as a server would, with a client that disconnects when `disconnect` is set."""
    raw = json.dumps(body).encode()
    sent = False
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"ts")], "client": ("127.0.0.1", 1),
             "server": ("ts", 80)}
    await app(scope, receive, send)
    return messages


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_cancels_the_request_at_the_workers(stream: bool) -> None:
    async with fake_deployment(pd_plan(), engine_kwargs={"step_delay_s": 0.01}) as dep:
        app = create_app(dep.router, ApiConfig("toy"))
        gone = asyncio.Event()
        call = asyncio.create_task(_asgi_call(app, "/v1/completions", {"model": "toy", "prompt": "long",
                                                                       "max_tokens": 400, "stream": stream}, gone))
        while dep.servers["d0"].core.state(0).running_decode == 0:
            await asyncio.sleep(0.01)
        gone.set()
        await asyncio.wait_for(call, 30)
        assert await asyncio.wait_for(_until_idle(dep), 30)
        assert dep.router.num_pending == 0


async def _until_idle(dep: Any) -> bool:
    while any(s.core.has_work() for s in dep.servers.values()) or dep.router.num_pending:
        await asyncio.sleep(0.01)
    return True


async def test_open_health_hides_pids_and_failure_reasons() -> None:
    async with fake_deployment(pd_plan()) as dep:
        app = create_app(dep.router, ApiConfig("toy", api_key="k"))
        async with _client(app) as http:
            await dep.servers["d0"].stop()
            for _ in range(500):
                if not all(w.alive for w in dep.router.workers()):
                    break
                await asyncio.sleep(0.01)
            r = await http.get("/health")
            assert r.json() == {"status": "degraded", "model": "toy", "workers_alive": 1, "workers_total": 2}
            assert (await http.get("/admin/workers")).status_code == 401


def test_output_cut_mid_character_ends_without_a_replacement_character() -> None:
    euro = "€".encode()  # 3 bytes
    text = TextStream(lambda ids: bytes(ids).decode("utf-8", errors="replace"), (), ())
    out = "".join(text.push(b)[0] for b in b"ab" + euro[:2])
    out += text.flush()
    assert out == "ab"
