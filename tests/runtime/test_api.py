"""OpenAI API over a fake deployment, in process (httpx ASGI transport + the official openai client)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtime_builders import fake_deployment, pd_plan

from thunderserve.runtime.api import ApiConfig, create_app
from thunderserve.runtime.fakes import FakeEngine

pytestmark = pytest.mark.anyio
KEY = "sk-test"


def _client(app, key: str | None = KEY) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ts", headers=headers)


def _chat_text(engine: FakeEngine, content: str, max_tokens: int) -> str:
    ids = engine.apply_chat_template([{"role": "user", "content": content}])
    return engine.decode_text(engine.greedy(ids, max_tokens))


async def test_openai_client_completions_and_chat_stream_and_not() -> None:
    async with fake_deployment(pd_plan()) as dep:
        app = create_app(dep.router, ApiConfig("toy", api_key=KEY))
        ref = dep.engines["p0"]
        async with _client(app, key=None) as http:
            client = openai.AsyncOpenAI(api_key=KEY, base_url="http://ts/v1", http_client=http)
            c = await client.completions.create(model="toy", prompt="hello", max_tokens=7, temperature=0)
            assert c.choices[0].text == ref.decode_text(ref.greedy(list(b"hello"), 7))
            assert c.choices[0].finish_reason == "length"
            assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (5, 7, 12)

            stream = await client.completions.create(model="toy", prompt="hello", max_tokens=7, temperature=0,
                                                     stream=True, stream_options={"include_usage": True})
            chunks = [ch async for ch in stream]
            assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
            assert chunks[-1].usage.completion_tokens == 7

            chat = await client.chat.completions.create(model="toy", max_tokens=6, temperature=0,
                                                        messages=[{"role": "user", "content": "hi"}])
            assert chat.choices[0].message.content == _chat_text(ref, "hi", 6)
            assert chat.choices[0].message.role == "assistant"
            sstream = await client.chat.completions.create(model="toy", max_tokens=6, temperature=0, stream=True,
                                                           messages=[{"role": "user", "content": "hi"}])
            deltas = [ch.choices[0].delta async for ch in sstream]
            assert deltas[0].role == "assistant"
            assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content

            stopped = await client.completions.create(model="toy", prompt="hello", max_tokens=7, temperature=0,
                                                      stop=[c.choices[0].text[3:5]], seed=3)
            assert stopped.choices[0].text == c.choices[0].text[:3] and stopped.choices[0].finish_reason == "stop"
            ids = await client.completions.create(model="toy", prompt=[104, 105], max_tokens=3, temperature=0,
                                                  extra_body={"return_token_ids": True})
            assert ids.choices[0].model_extra["token_ids"] == ref.greedy([104, 105], 3)
            assert [m.id for m in (await client.models.list()).data] == ["toy"]

            with pytest.raises(openai.NotFoundError) as nf:
                await client.completions.create(model="nope", prompt="x", max_tokens=2)
            assert nf.value.body["code"] == "model_not_found"
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model="toy", messages=[])
            bad = openai.AsyncOpenAI(api_key="wrong", base_url="http://ts/v1", http_client=http)
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()


@pytest.mark.parametrize(("body", "status", "param"), [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "toy"}).encode(), 422, "prompt"),
    (json.dumps({"model": "toy", "prompt": "a", "max_tokens": "5"}).encode(), 422, "max_tokens"),
    (json.dumps({"model": "toy", "prompt": "a", "temperature": 9}).encode(), 422, "temperature"),
    (json.dumps({"model": "toy", "prompt": "a", "max_tokens": 10_000}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "toy", "prompt": "a" * 600, "max_tokens": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "toy", "prompt": "", "max_tokens": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "toy", "prompt": ["a", "b"]}).encode(), 400, "prompt"),
    (json.dumps({"model": "toy", "prompt": "a", "n": 2}).encode(), 422, "n"),
    (json.dumps({"model": "other", "prompt": "a"}).encode(), 404, "model"),
])
async def test_invalid_completions_get_openai_error_bodies(body: bytes, status: int, param: str | None) -> None:
    async with fake_deployment(pd_plan()) as dep:
        app = create_app(dep.router, ApiConfig("toy"))
        async with _client(app, key=None) as http:
            r = await http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


async def test_invalid_chat_and_auth_and_unknown_route() -> None:
    async with fake_deployment(pd_plan()) as dep:
        app = create_app(dep.router, ApiConfig("toy", api_key=KEY))
        async with _client(app) as http:
            r = await http.post("/v1/chat/completions", json={"model": "toy", "messages": [{"role": "robot"}]})
            assert r.status_code == 422 and r.json()["error"]["param"].startswith("messages.0.role")
            r = await http.post("/v1/chat/completions", json={"model": "toy", "messages": "hi"})
            assert r.status_code == 422
            r = await http.get("/v1/nothing")
            assert r.status_code == 404 and "error" in r.json()
        async with _client(app, key=None) as anon:
            for path in ("/v1/models", "/admin/workers"):
                r = await anon.get(path)
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await anon.get("/health")).status_code == 200


async def test_health_metrics_admin_and_worker_failure_in_a_stream() -> None:
    async with fake_deployment(pd_plan(), engine_kwargs={"step_delay_s": 0.01}) as dep:
        app = create_app(dep.router, ApiConfig("toy"))
        async with _client(app, key=None) as http:
            r = await http.post("/v1/completions", json={"model": "toy", "prompt": "abc", "max_tokens": 4})
            assert r.status_code == 200
            workers = (await http.get("/admin/workers")).json()["data"]
            assert {w["group_id"]: w["role"] for w in workers} == {"p0": "prefill", "d0": "decode"}
            assert all(w["alive"] and w["pid"] > 0 and w["weights_token"] for w in workers)
            metrics = (await http.get("/metrics")).text
            families = {f.name: f for f in text_string_to_metric_families(metrics)}
            assert families["thunderserve_ttft_seconds"].type == "histogram"
            count = next(s.value for s in families["thunderserve_ttft_seconds"].samples
                         if s.name.endswith("_count"))
            assert count == 1
            assert {s.labels["group"] for s in families["thunderserve_worker_up"].samples} == {"p0", "d0"}
            assert "thunderserve_worker_queue_depth" in families and "thunderserve_kv_bytes_sent" in families

            async def kill_decode_worker() -> None:
                while dep.servers["d0"].core.state(0).running_decode == 0:
                    await asyncio.sleep(0.01)
                await dep.servers["d0"].stop()

            killer = asyncio.create_task(kill_decode_worker())
            r = await http.post("/v1/completions", json={"model": "toy", "prompt": "abc", "max_tokens": 300,
                                                         "stream": True})
            await killer
            assert r.status_code == 200
            lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert lines[-1] == "[DONE]"
            err = json.loads(lines[-2])["error"]
            assert err["type"] == "server_error" and "worker 'd0'" in err["message"]
            health = await http.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "degraded"
