"""Load generator for a running server (`thunderserve bench-serve`): Poisson arrivals, trace-sampled lengths.

Requests follow `WorkloadSpec.poisson_requests` (the simulator's own arrival process). Lengths from the trace
are scaled into the served model's context: prompts by `max_prompt_tokens / p99(trace prompts)`, outputs by
`max_output_tokens / p99(trace outputs)`, each clipped to [1, max]. A prompt of n tokens is n words of filler
text (common English words, about one token each). Requests stream with `ignore_eos` so each produces exactly
its sampled output length; latencies are measured at the client. The summary has the simulator's keys.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np

from thunderserve.sim.metrics import Percentiles
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

FILLER_WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
                "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they",
                "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been")


@dataclass(frozen=True)
class PlannedRequest:
    send_at_s: float  # offset from the start of the run
    prompt_tokens: int  # words of filler text
    output_tokens: int  # max_tokens (exact, with ignore_eos)


@dataclass(frozen=True)
class RequestResult:
    planned: PlannedRequest
    ok: bool
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    output_tokens: int = 0
    prompt_tokens: int = 0  # as counted by the server
    finish_s: float = math.nan  # offset from the start of the run
    error: str = ""

    @property
    def tpot_s(self) -> float:
        if not self.ok or self.output_tokens < 2:
            return math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def filler_prompt(num_tokens: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(FILLER_WORDS[i] for i in rng.integers(0, len(FILLER_WORDS), size=max(num_tokens, 1)))


def _scaled(values: np.ndarray, limit: int) -> np.ndarray:
    p99 = float(np.percentile(values, 99)) if values.size else 1.0
    scale = min(1.0, limit / max(p99, 1.0))
    return np.clip(np.rint(values * scale), 1, limit).astype(int)


def plan_requests(workload: WorkloadSpec, rate_rps: float, duration_s: float, seed: int, max_prompt_tokens: int,
                  max_output_tokens: int) -> list[PlannedRequest]:
    """The request schedule: the simulator's Poisson arrivals with lengths scaled into the model's context."""
    times, prompts, outputs = workload.poisson_requests(rate_rps, duration_s, seed)
    p = _scaled(np.asarray(prompts, dtype=float), max_prompt_tokens)
    o = _scaled(np.asarray(outputs, dtype=float), max_output_tokens)
    return [PlannedRequest(float(t), int(a), int(b)) for t, a, b in zip(times, p, o, strict=True)]


async def _one(client: httpx.AsyncClient, model: str, req: PlannedRequest, index: int, start: float,
               seed: int) -> RequestResult:
    await asyncio.sleep(max(0.0, start + req.send_at_s - time.perf_counter()))
    body = {"model": model, "prompt": filler_prompt(req.prompt_tokens, seed * 1_000_003 + index),
            "max_tokens": req.output_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    prompt_tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                return RequestResult(req, False, error=f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(req, False, error=str(chunk["error"].get("message")))
                if chunk.get("usage"):
                    prompt_tokens = int(chunk["usage"]["prompt_tokens"])
                    tokens = int(chunk["usage"]["completion_tokens"])
                for choice in chunk.get("choices", []):
                    if choice.get("token_ids") and first is None:
                        first = time.perf_counter()
    except httpx.HTTPError as exc:
        return RequestResult(req, False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if first is None:
        return RequestResult(req, False, error="no token received")
    return RequestResult(req, True, first - sent, end - sent, tokens, prompt_tokens, end - start)


async def run_load(url: str, requests: list[PlannedRequest], *, model: str | None = None,
                   api_key: str | None = None, seed: int = 0, timeout_s: float = 600.0,
                   on_done: Callable[[RequestResult], None] | None = None) -> tuple[list[RequestResult], float]:
    """Replay the schedule against `url`; returns the results (in schedule order) and the wall time."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s,
                                 limits=limits) as client:
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = str(r.json()["data"][0]["id"])
        start = time.perf_counter()

        async def tracked(i: int, req: PlannedRequest) -> RequestResult:
            res = await _one(client, str(model), req, i, start, seed)
            if on_done is not None:
                on_done(res)
            return res

        results = await asyncio.gather(*[tracked(i, r) for i, r in enumerate(requests)])
        return list(results), time.perf_counter() - start


async def served_context(url: str, api_key: str | None = None) -> tuple[str, int]:
    """(model id, max context tokens) as the server reports them at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=30) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        entry = r.json()["data"][0]
        return str(entry["id"]), int(entry.get("max_model_len") or 2048)


def summarize(results: list[RequestResult], slo: SloSpec | None = None) -> dict[str, float | int | None]:
    """The simulator's metric keys (seconds) over the run; failed requests count as SLO misses."""
    ok = [r for r in results if r.ok]
    span = max((r.finish_s for r in ok), default=math.nan)
    out: dict[str, float | int | None] = {
        "num_requests": len(results), "num_failed": len(results) - len(ok),
        "slo_attainment": None,
        "throughput_rps": len(ok) / span if ok and span > 0 else math.nan,
        "throughput_tokens_s": sum(r.output_tokens for r in ok) / span if ok and span > 0 else math.nan,
    }
    if slo is not None and results:
        met = sum(1 for r in ok if r.ttft_s <= slo.ttft_s and (r.output_tokens < 2 or r.tpot_s <= slo.tpot_s))
        out["slo_attainment"] = met / len(results)
    for stem, values in (("ttft", [r.ttft_s for r in ok]), ("tpot", [r.tpot_s for r in ok]),
                         ("e2e", [r.e2e_s for r in ok])):
        pct = Percentiles.of(np.asarray(values, dtype=float))
        out[f"p50_{stem}_s"], out[f"p90_{stem}_s"], out[f"p99_{stem}_s"] = pct.p50, pct.p90, pct.p99
    return out
