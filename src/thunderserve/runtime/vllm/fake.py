"""In-repo fake of the group-client seam: a deterministic toy instance, so `VllmRouter` is tested without vLLM.

Tokens are bytes of the prompt text; the next token is `fake_next_token` of the whole context (prompt and
output so far), so a retry that resumes from prompt + delivered tokens continues exactly as an uninterrupted
run would. A prefill returns a KV handle naming the instance; a decode checks it came from a prefill of the
same context (a stale or foreign handle fails, as lost KV would). `die()` makes every call fail (a killed
instance), `die_after_tokens` kills it mid-stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from thunderserve.runtime.fakes import fake_next_token
from thunderserve.runtime.vllm.client import Chunk, InstanceDown, InstanceRejected, Sampling
from thunderserve.runtime.workers.protocol import GenerateRequest


@dataclass
class FakeGroupClient:
    name: str
    alive: bool = True
    die_after_tokens: int | None = None  # generated tokens (over all streams) after which the instance dies
    step_delay_s: float = 0.0
    generated: int = 0
    prefills: int = 0
    decodes_from_kv: int = 0  # generations that started from a remote prefill's KV
    calls: list[str] = field(default_factory=list)
    _kv: dict[str, int] = field(default_factory=dict)  # handle -> context length it holds

    def die(self) -> None:
        self.alive = False

    def _check(self) -> None:
        if not self.alive:
            raise InstanceDown(f"{self.name}: connection refused")

    async def tokenize(self, req: GenerateRequest) -> list[int]:
        self._check()
        self.calls.append("tokenize")
        if req.prompt_ids:
            return list(req.prompt_ids)
        text = req.prompt if req.prompt is not None else "".join(m["content"] for m in req.messages or ())
        if not text:
            raise InstanceRejected(400, "prompt must not be empty", "prompt")
        return list(text.encode())

    async def prefill(self, prompt_ids: list[int], sampling: Sampling) -> dict[str, Any]:
        self._check()
        self.calls.append("prefill")
        self.prefills += 1
        handle = f"{self.name}-{self.prefills}"
        self._kv[handle] = len(prompt_ids)
        return {"remote_engine_id": self.name, "handle": handle, "remote_num_tokens": len(prompt_ids)}

    async def generate(self, prompt_ids: list[int], sampling: Sampling,
                       kv_transfer_params: dict[str, Any] | None) -> AsyncIterator[Chunk]:
        self._check()
        self.calls.append("generate")
        if kv_transfer_params is not None:
            if kv_transfer_params.get("remote_num_tokens") != len(prompt_ids):
                raise InstanceDown(f"{self.name}: KV handle does not match the prompt")
            self.decodes_from_kv += 1
        context = list(prompt_ids)
        for i in range(sampling.max_tokens):
            if self.step_delay_s:
                await asyncio.sleep(self.step_delay_s)
            else:
                await asyncio.sleep(0)
            if self.die_after_tokens is not None and self.generated >= self.die_after_tokens:
                self.alive = False
            self._check()
            tok = fake_next_token(context)
            context.append(tok)
            self.generated += 1
            last = i == sampling.max_tokens - 1
            yield Chunk((tok,), chr(tok) if tok < 256 else "", "length" if last else None)

    async def healthy(self) -> bool:
        return self.alive

    async def metrics_text(self) -> str:
        self._check()
        return (f"# HELP fake_generated_tokens Tokens generated.\n# TYPE fake_generated_tokens counter\n"
                f"fake_generated_tokens_total {self.generated}\n")

    async def aclose(self) -> None:
        return None
