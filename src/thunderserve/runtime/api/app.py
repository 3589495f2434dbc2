"""The OpenAI-compatible HTTP server (FastAPI): a thin layer over the `Router`.

Routes: POST /v1/completions, POST /v1/chat/completions (SSE streaming or not), GET /v1/models, GET /health,
GET /metrics (Prometheus text), GET /admin/* (see `api.admin`). With an API key, /v1 and /admin need
`Authorization: Bearer <key>` (401 otherwise). Every client error is an OpenAI error body with a 4xx status
(bad JSON 400, schema/type errors 422, invalid values 400, unknown model 404); runtime failures (a worker
died) are 503 with type "server_error" - in a stream, an `error` event followed by `[DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from thunderserve.runtime.api.admin import AdminState
from thunderserve.runtime.api.limits import RequestLimits, check_prompt_size, parse_json, read_body
from thunderserve.runtime.api.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    error_body,
    refuse_unsupported,
    usage_chunk,
)
from thunderserve.runtime.engine.base import SamplingParams
from thunderserve.runtime.frontend import Frontend
from thunderserve.runtime.metrics import RuntimeMetrics
from thunderserve.runtime.router_records import Accepted, Delta, Failed, Finished, RequestHandle
from thunderserve.runtime.workers.protocol import GenerateRequest

log = logging.getLogger("thunderserve.api")


@dataclass(frozen=True)
class ApiConfig:
    model_name: str  # the id clients pass as "model" (and /v1/models lists)
    api_key: str | None = None  # when set, /v1 and /admin require "Authorization: Bearer <api_key>"
    model_aliases: tuple[str, ...] = ()  # other accepted ids (e.g. the model path)
    limits: RequestLimits = RequestLimits()  # body size, JSON depth, prompt size (checked before any work)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def _api_error(f: Failed) -> ApiError:
    headers = {"Retry-After": str(max(1, round(f.retry_after_s)))} if f.retry_after_s is not None else None
    return ApiError(f.status, f.message, f.error_type, f.param, f.code, headers)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(router: Frontend, config: ApiConfig, *, admin: AdminState | None = None,
               metrics: RuntimeMetrics | None = None,
               lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None) -> FastAPI:
    """Build the app around a router (started by `lifespan`, or by the caller before serving)."""
    app = FastAPI(title="ThunderServe", lifespan=lifespan)
    admin = admin or AdminState(router)
    app.state.admin = admin
    app.state.router = router
    metrics = metrics or RuntimeMetrics(router)
    app.state.metrics = metrics
    model_ids = {config.model_name, *config.model_aliases}

    def require_key(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), config.api_key):
            raise ApiError(401, "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else exc.headers
        return JSONResponse(exc.body, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=str(exc.status_code)),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in err["loc"] if p != "body") or None
        return JSONResponse(error_body(f"{param}: {err['msg']}" if param else str(err["msg"]), param=param),
                            status_code=422)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error serving a request: %s: %s", type(exc).__name__, exc)
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", "server_error"), status_code=500)

    limits = config.limits

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        raw = await read_body(request, limits.max_body_bytes)
        data = await asyncio.to_thread(parse_json, raw, limits.max_json_depth)
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        refuse_unsupported(data)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise ApiError(422, f"{param}: {err['msg']}" if param else err["msg"], param=param,
                           code="invalid_type" if err["type"].endswith("_type") else "invalid_value") from None

    def check_common(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None) -> None:
        if req.model not in model_ids:
            raise ApiError(404, f"The model '{req.model}' does not exist (serving '{config.model_name}')",
                           param="model", code="model_not_found")
        ctx = router.max_context_tokens
        if max_tokens is not None and ctx and max_tokens >= ctx:
            raise ApiError(400, f"max_tokens={max_tokens} does not fit the model's context of {ctx} tokens",
                           param="max_tokens", code="context_length_exceeded")
        if isinstance(req, CompletionRequest):
            text, ids = req.prompt_forms()
            check_prompt_size(len(text or ""), len(ids or ()), ctx, limits, "prompt")
        else:
            chars = sum(len(m.text()) for m in req.messages)
            check_prompt_size(chars, 0, ctx, limits, "messages")

    def generate_request(prefix: str, req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
                         **prompt: Any) -> GenerateRequest:
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        sampling = SamplingParams(max_tokens=max_tokens or 0, temperature=req.temperature, top_p=req.top_p,
                                  seed=req.seed, stop=req.stop_strings())
        return GenerateRequest(request_id=f"{prefix}-{uuid.uuid4().hex}", sampling=sampling, seed=seed,
                               max_tokens=max_tokens, arrival_s=time.time(), ignore_eos=req.ignore_eos, **prompt)

    async def start(greq: GenerateRequest) -> tuple[RequestHandle, Accepted]:
        handle = await router.submit(greq)
        try:
            first = await handle.next()
        except BaseException:  # the client went away while the request was being accepted
            await router.cancel(handle.request_id)
            raise
        if isinstance(first, Failed):
            raise _api_error(first)
        assert isinstance(first, Accepted)
        return handle, first

    async def collect(request: Request, handle: RequestHandle) -> tuple[str, list[int], Finished]:
        """The whole output of a non-streaming request; a client that disconnects cancels it at once."""
        gone = asyncio.create_task(_wait_disconnect(request))
        try:
            parts: list[str] = []
            ids: list[int] = []
            while True:
                nxt = asyncio.ensure_future(handle.next())
                await asyncio.wait((nxt, gone), return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    raise ApiError(499, "client disconnected", code="client_disconnected")
                ev = nxt.result()
                if isinstance(ev, Delta):
                    parts.append(ev.text)
                    ids.extend(ev.token_ids)
                elif isinstance(ev, Finished):
                    return "".join(parts), ids, ev
                elif isinstance(ev, Failed):
                    raise _api_error(ev)
        finally:
            gone.cancel()
            if not handle.done:
                await router.cancel(handle.request_id)

    async def stream(handle: RequestHandle, accepted: Accepted, chunk: Callable[[str, str | None, list[int] | None,
                     bool], dict[str, Any]], obj: str, include_usage: bool, with_ids: bool) -> AsyncIterator[str]:
        try:
            first = chunk("", None, [] if with_ids else None, True)
            if first:
                yield _sse(first)
            async for ev in handle:
                if isinstance(ev, Delta):
                    if ev.text or with_ids:
                        yield _sse(chunk(ev.text, None, list(ev.token_ids) if with_ids else None, False))
                elif isinstance(ev, Finished):
                    yield _sse(chunk("", ev.finish_reason, [] if with_ids else None, False))
                    if include_usage:
                        c = chunk("", None, None, False)
                        yield _sse(usage_chunk(c["id"], c["model"], c["created"], obj, ev.prompt_tokens,
                                               ev.completion_tokens))
                elif isinstance(ev, Failed):
                    yield _sse(error_body(ev.message, ev.error_type, ev.param, ev.code))
            yield _sse("[DONE]")
        finally:
            if not handle.done:
                await router.cancel(handle.request_id)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Open to anyone: status and counts only (process ids and failure reasons are at /admin/workers)."""
        workers = [w for w in router.workers() if w.in_plan]
        alive = [w for w in workers if w.alive]
        can_serve = bool(router.entry_groups())
        status = "ok" if len(alive) == len(workers) and can_serve else ("degraded" if can_serve else "down")
        body = {"status": status, "model": config.model_name, "workers_alive": len(alive),
                "workers_total": len(workers)}
        return JSONResponse(body, status_code=200 if can_serve else 503)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "thunderserve",
                                            "max_model_len": router.max_context_tokens}]}

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(request: Request) -> Response:
        req: CompletionRequest = await parse(request, CompletionRequest)
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo", code="unsupported_parameter")
        check_common(req, req.max_tokens)
        text, ids = req.prompt_forms()
        greq = generate_request("cmpl", req, req.max_tokens, prompt=text, prompt_ids=ids)
        handle, accepted = await start(greq)
        rid, created, model = greq.request_id, int(time.time()), req.model
        if req.stream:
            def chunk(t: str, fr: str | None, tok: list[int] | None, first: bool) -> dict[str, Any]:
                return {} if first else completion_chunk(rid, model, created, t, fr, tok)

            return StreamingResponse(stream(handle, accepted, chunk, "text_completion", req.include_usage,
                                            req.return_token_ids), media_type="text/event-stream")
        out, out_ids, fin = await collect(request, handle)
        return JSONResponse(completion_body(rid, model, out, fin.finish_reason, fin.prompt_tokens,
                                            fin.completion_tokens, out_ids if req.return_token_ids else None))

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
        if not req.messages:
            raise ApiError(400, "messages must not be empty", param="messages")
        max_tokens = req.resolved_max_tokens()
        check_common(req, max_tokens)
        messages = tuple({"role": m.role, "content": m.text()} for m in req.messages)
        greq = generate_request("chatcmpl", req, max_tokens, messages=messages)
        handle, accepted = await start(greq)
        rid, created, model = greq.request_id, int(time.time()), req.model
        if req.stream:
            def chunk(t: str, fr: str | None, tok: list[int] | None, first: bool) -> dict[str, Any]:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
                    {"content": t} if t or fr is None else {})
                return chat_chunk(rid, model, created, delta, fr, tok)

            return StreamingResponse(stream(handle, accepted, chunk, "chat.completion.chunk",
                                            req.include_usage, req.return_token_ids),
                                     media_type="text/event-stream")
        out, out_ids, fin = await collect(request, handle)
        return JSONResponse(chat_body(rid, model, out, fin.finish_reason, fin.prompt_tokens, fin.completion_tokens,
                                      out_ids if req.return_token_ids else None))

    for extra in admin.routes:
        app.include_router(extra, dependencies=[Depends(require_key)])
    return app
