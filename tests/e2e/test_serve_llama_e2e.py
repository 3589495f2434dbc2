"""End to end on a real (tiny, random) Llama: `thunderserve serve` with 1 prefill + 1 decode worker.

Greedy outputs through the disaggregated path (prefill worker -> KV over TCP, no compression -> decode
worker) must be token-identical to transformers' own `generate` on the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_serve_cli_fake import free_port, pid_alive, wait_gone, wait_healthy
from tiny_llama import build_tiny_llama, reference_greedy

pytestmark = pytest.mark.slow
if not hasattr(pytest.importorskip("thunderserve.runtime.engine"), "load_engine"):
    pytest.skip("the model engine (runtime.engine.load_engine) is not in this tree", allow_module_level=True)
KEY = "sk-llama"
PROMPTS = ["hello world how are you", "tell me a story", "once upon a time the cat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen, str]]:
    plan = {"format": "thunderserve.plan/v1", "model": "tiny-llama", "cluster": "local",
            "kv_transfer": {"compression": "none"},
            "groups": [{"id": "p0", "phase": "prefill", "stages": [{"gpus": ["local:0"], "layers": [0, 2]}]},
                       {"id": "d0", "phase": "decode", "stages": [{"gpus": ["local:1"], "layers": [0, 2]}]}],
            "routing": {"entry": {"p0": 1.0}, "kv": {"p0": {"d0": 1.0}}}}
    plan_path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan_path.write_text(json.dumps(plan))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "thunderserve", "serve", "--engine", "builtin", "--plan", str(plan_path), "--model",
                             str(model_dir), "--port", str(port), "--api-key", KEY, "--cpu-threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout_s=180)
        yield proc, url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_greedy_completions_match_transformers(server, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, url = server
    tok = _tokenizer(model_dir)
    client = openai.OpenAI(api_key=KEY, base_url=f"{url}/v1")
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ref = reference_greedy(model_dir, ids, 24)
        c = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0,
                                      extra_body={"return_token_ids": True})
        assert c.choices[0].model_extra["token_ids"] == ref, prompt
        assert c.choices[0].text == tok.decode(ref, skip_special_tokens=True)
        assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(ids), len(ref))
        assert c.choices[0].finish_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
        chunks = list(client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.choices[0].text
        assert chunks[-1].usage.completion_tokens == len(ref)


def test_chat_matches_transformers_and_sampling_is_seeded(server, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, url = server
    tok = _tokenizer(model_dir)
    client = openai.OpenAI(api_key=KEY, base_url=f"{url}/v1")
    messages = [{"role": "user", "content": "hello how are you"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    ref = reference_greedy(model_dir, ids, 16)
    chat = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert chat.choices[0].model_extra["token_ids"] == ref
    assert chat.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == chat.choices[0].message.content

    def sample(seed: int) -> str:
        return client.completions.create(model="tiny-llama", prompt="tell me a story", max_tokens=12,
                                         temperature=1.0, top_p=0.9, seed=seed).choices[0].text

    assert sample(11) == sample(11)
    assert len({sample(s) for s in range(4)}) > 1


def test_errors_metrics_and_clean_shutdown(server) -> None:  # type: ignore[no-untyped-def]
    proc, url = server
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = [
        ({"model": "tiny-llama", "prompt": "hello", "max_tokens": 100_000}, 400, "max_tokens"),
        ({"model": "tiny-llama", "prompt": "hello " * 300, "max_tokens": 4}, 400, "prompt"),
        ({"model": "nope", "prompt": "hello"}, 404, "model"),
        ({"model": "tiny-llama", "prompt": "hello", "temperature": "hot"}, 422, "temperature"),
    ]
    for body, status, param in cases:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == param
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "tiny-llama", "messages": []}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{url}/v1/completions", content=b"{oops", headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "x"}).status_code == 401

    # a generation of its own (under xdist the module's other tests may run against another server), then
    # wait for a heartbeat to carry the worker's KV gauges to the router
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 2},
                   headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while True:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
        sent = [s for s in families["thunderserve_kv_bytes_sent"].samples if s.labels.get("dst") == "d0"]
        if (sent and sent[0].value > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sent and sent[0].value > 0
    assert any(s.value > 0 for s in families["thunderserve_ttft_seconds"].samples if s.name.endswith("_count"))
    workers = httpx.get(f"{url}/admin/workers", headers=auth).json()["data"]
    pids = [w["pid"] for w in workers]
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    assert all(isinstance(w["weights_token"], int) for w in workers)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert wait_gone(pids, 10) == []
