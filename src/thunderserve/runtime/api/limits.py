"""Limits checked before any work is done for a request: body size, JSON shape, prompt size.

Why here, in the HTTP layer: every check is cheap and runs on what the client sent, before a byte reaches a
worker. A body over `max_body_bytes` is refused (413) while it is read, never buffered whole; JSON deeper
than `max_json_depth` or holding a lone UTF-16 surrogate is refused (400) before the schema sees it; a prompt
with more characters than its context could ever hold is refused (400) before it is tokenised (tokenising
megabytes takes a worker's only compute thread for seconds and stalls every other request).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from thunderserve.runtime.api.protocol import ApiError

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # below the router->worker frame cap (16 MiB), with room for the JSON
DEFAULT_MAX_JSON_DEPTH = 32  # OpenAI bodies nest 4-5 deep (messages -> content parts -> text)
# No tokenizer we ship has a token longer than this many characters, so a prompt of more than
# context x this characters cannot fit the context whatever it says (the fake engine: 1 byte per token).
DEFAULT_MAX_CHARS_PER_TOKEN = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class RequestLimits:
    """Knobs of the pre-work checks (see module docstring)."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    max_chars_per_token: int = DEFAULT_MAX_CHARS_PER_TOKEN


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it (or its Content-Length) exceeds `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes",
                       code="request_too_large")
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_bytes} bytes",
                               code="request_too_large")
            parts.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client disconnected while sending the body", code="client_disconnected") from None
    return b"".join(parts)


def parse_json(raw: bytes, max_depth: int) -> Any:
    """Parse a JSON body; 400 with a message naming the problem (never a traceback) for bad JSON, nesting
    deeper than `max_depth`, or a string holding a lone surrogate (not text: no tokenizer can take it).
    Linear in the body's size; callers run it off the event loop (`asyncio.to_thread`)."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"request body nests deeper than {max_depth} levels", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    _check_tree(data, max_depth)
    return data


def _check_tree(data: Any, max_depth: int) -> None:
    """Walk the parsed body iteratively: depth within `max_depth`, no string or key with a lone surrogate."""
    stack: list[tuple[str, int, Any]] = [("", 0, data)]
    while stack:
        path, depth, v = stack.pop()
        if isinstance(v, str):
            if _SURROGATE.search(v):
                raise ApiError(400, f"{path or 'body'}: string holds a lone UTF-16 surrogate (not valid Unicode "
                                    "text)", param=path or None, code="invalid_value")
            continue
        if not isinstance(v, dict | list):
            continue
        if depth >= max_depth:
            raise ApiError(400, f"{path or 'body'}: request body nests deeper than {max_depth} levels",
                           code="invalid_json")
        if isinstance(v, dict):
            for k, item in v.items():
                sub = f"{path}.{k}" if path else str(k)
                if _SURROGATE.search(k):
                    raise ApiError(400, f"{sub}: key holds a lone UTF-16 surrogate", code="invalid_value")
                stack.append((sub, depth + 1, item))
        else:
            stack.extend((f"{path}.{i}" if path else str(i), depth + 1, item) for i, item in enumerate(v)
                         if isinstance(item, str | dict | list))


def check_prompt_size(chars: int, tokens: int, context_tokens: int, limits: RequestLimits, param: str) -> None:
    """Refuse (400 context_length_exceeded) a prompt that cannot fit the context, before tokenising it:
    `tokens` given as ids are counted exactly, text by the characters-per-token bound."""
    if context_tokens <= 0:
        return
    if tokens >= context_tokens:
        raise ApiError(400, f"This model's maximum context length is {context_tokens} tokens; the {param} has "
                            f"{tokens} tokens. Please reduce the length.", param=param,
                       code="context_length_exceeded")
    max_chars = context_tokens * limits.max_chars_per_token
    if chars > max_chars:
        raise ApiError(400, f"This model's maximum context length is {context_tokens} tokens; the {param} has "
                            f"{chars} characters, more than {max_chars} cannot fit. Please reduce the length.",
                       param=param, code="context_length_exceeded")
