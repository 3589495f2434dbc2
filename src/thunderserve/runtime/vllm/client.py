"""The group-client seam: what the router needs from one group's engine instance, and its vLLM implementation.

A `GroupClient` tokenizes a request, runs a prefill that leaves its KV cache for a remote decode, streams a
generation (optionally from KV a prefill left elsewhere), and reports health and Prometheus metrics. The vLLM
implementation talks to one vLLM OpenAI server over HTTP:

    tokenize  POST /tokenize            (chat: the model's template, generation prompt added)
    prefill   POST /v1/completions      max_tokens 1, kv_transfer_params {"do_remote_decode": true}
              -> the response's kv_transfer_params (where the KV waits; NixlConnector reads it from there)
    generate  POST /v1/completions      stream, token ids returned, kv_transfer_params from the prefill
    health    GET  /health              metrics  GET /metrics

Prompts always go as token ids, so a retry can resume after the tokens already delivered (prompt + output
so far) on any instance. An instance that cannot be reached, drops a stream or answers 5xx raises
`InstanceDown` (retry elsewhere); a 4xx raises `InstanceRejected` with vLLM's OpenAI error, which the router
relays to the client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from thunderserve.runtime.workers.protocol import GenerateRequest


class InstanceDown(RuntimeError):
    """The instance is unreachable, dropped the connection or failed internally (5xx)."""


class InstanceRejected(RuntimeError):
    """The instance refused the request (4xx): the client's request is at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


@dataclass(frozen=True)
class Chunk:
    """Tokens an instance generated (in order), with their text and, on the last, why it stopped."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Sampling:
    """What a generation step needs besides the prompt (from the client's request)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def of(req: GenerateRequest, max_tokens: int) -> Sampling:
        s = req.sampling
        return Sampling(max_tokens, s.temperature, s.top_p, s.seed, tuple(s.stop), req.ignore_eos)

    def body(self) -> dict[str, Any]:
        d: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                             "ignore_eos": self.ignore_eos, **self.extra}
        if self.seed is not None:
            d["seed"] = self.seed
        if self.stop:
            d["stop"] = list(self.stop)
        return d


class GroupClient(Protocol):
    """One group's engine instance, as the router sees it."""

    async def tokenize(self, req: GenerateRequest) -> list[int]: ...

    async def prefill(self, prompt_ids: list[int], sampling: Sampling) -> dict[str, Any]: ...

    def generate(self, prompt_ids: list[int], sampling: Sampling,
                 kv_transfer_params: dict[str, Any] | None) -> AsyncIterator[Chunk]: ...

    async def healthy(self) -> bool: ...

    async def metrics_text(self) -> str: ...

    async def aclose(self) -> None: ...


class VllmGroupClient:
    """A vLLM OpenAI server at `base_url` serving the model as `model`."""

    def __init__(self, base_url: str, model: str, request_timeout_s: float | None = None,
                 connect_timeout_s: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits, trust_env=False)

    async def tokenize(self, req: GenerateRequest) -> list[int]:
        if req.prompt_ids:
            return list(req.prompt_ids)
        body: dict[str, Any] = {"model": self.model}
        if req.messages:
            body.update(messages=[dict(m) for m in req.messages], add_generation_prompt=True)
        else:
            body["prompt"] = req.prompt or ""
        data = await self._post("/tokenize", body)
        return [int(t) for t in data["tokens"]]

    async def prefill(self, prompt_ids: list[int], sampling: Sampling) -> dict[str, Any]:
        body = {"model": self.model, "prompt": prompt_ids, **sampling.body(), "max_tokens": 1, "stream": False,
                "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False,
                                       "remote_engine_id": None, "remote_block_ids": None,
                                       "remote_host": None, "remote_port": None}}
        data = await self._post("/v1/completions", body)
        params = data.get("kv_transfer_params")
        if not isinstance(params, dict):
            raise InstanceDown(f"{self.base_url}: prefill returned no kv_transfer_params (is the KV connector "
                               "configured?)")
        return params

    async def generate(self, prompt_ids: list[int], sampling: Sampling,
                       kv_transfer_params: dict[str, Any] | None) -> AsyncIterator[Chunk]:
        body: dict[str, Any] = {"model": self.model, "prompt": prompt_ids, **sampling.body(), "stream": True,
                                "return_token_ids": True}
        if kv_transfer_params is not None:
            body["kv_transfer_params"] = kv_transfer_params
        try:
            async with self._http.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    self._raise_for(resp)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    data = json.loads(payload)
                    if "error" in data:
                        raise InstanceDown(f"{self.base_url}: {data['error'].get('message', data['error'])}")
                    for choice in data.get("choices", ()):
                        ids = tuple(int(t) for t in choice.get("token_ids") or ())
                        text = str(choice.get("text") or "")
                        reason = choice.get("finish_reason")
                        if ids or text or reason:
                            yield Chunk(ids, text, reason)
        except httpx.HTTPError as exc:
            raise InstanceDown(f"{self.base_url}: {type(exc).__name__}: {exc}") from None
        raise InstanceDown(f"{self.base_url}: stream ended without [DONE]")

    async def healthy(self) -> bool:
        try:
            return (await self._http.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    async def metrics_text(self) -> str:
        try:
            resp = await self._http.get("/metrics", timeout=5.0)
        except httpx.HTTPError as exc:
            raise InstanceDown(f"{self.base_url}: {exc}") from None
        return resp.text if resp.status_code == 200 else ""

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise InstanceDown(f"{self.base_url}: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            self._raise_for(resp)
        data = resp.json()
        if not isinstance(data, dict):
            raise InstanceDown(f"{self.base_url}{path}: unexpected answer {data!r:.200}")
        return data

    def _raise_for(self, resp: httpx.Response) -> None:
        try:
            err = resp.json().get("error", {})
            message = str(err.get("message") or resp.text)
            param, code = err.get("param"), err.get("code")
        except (json.JSONDecodeError, AttributeError):
            message, param, code = resp.text, None, None
        if 400 <= resp.status_code < 500:
            raise InstanceRejected(resp.status_code, message, param, None if code is None else str(code))
        raise InstanceDown(f"{self.base_url}: HTTP {resp.status_code}: {message[:300]}")
