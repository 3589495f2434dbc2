"""The engine seam: what workers need from a model executor.

Contract between `runtime.engine` (the PyTorch implementation) and `runtime.workers` (which drive it).
Workers only ever talk to an engine through `EngineProtocol`, so they can be tested with an in-repo fake.

Shapes (one request, one pipeline stage holding `num_layers` layers):
    KVCache.keys / KVCache.values: [num_layers, num_kv_heads, num_tokens, head_dim]

Request lifecycle as seen by the engine:
    prefill(prompt ids) -> (first-token logits, KVCache)      # prefill worker
    export: KVCache -> bytes (runtime.kv, optionally quantised) -> import on the decode worker
    decode([(last token, KVCache), ...]) -> next-token logits # decode worker, KV extended in place
Continuous batching happens one level up: requests join and leave between `decode` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class KVBuffer:
    """Preallocated storage a `KVCache`'s keys/values are prefix views of (lets decode append without copying).

    Owned by exactly one sequence: `num_tokens` is the length that sequence committed, so a shallow copy of the
    cache that falls behind is detected and gets its own storage instead of overwriting the other's tokens.
    """

    keys: torch.Tensor  # [num_layers, num_kv_heads, capacity_tokens, head_dim]
    values: torch.Tensor  # same shape as keys
    num_tokens: int  # tokens written so far (the views cover [0, num_tokens))

    @property
    def capacity_tokens(self) -> int:
        return int(self.keys.shape[2])


@dataclass
class KVCache:
    """Per-request KV cache of one stage (mutable: decode appends one token per step)."""

    keys: torch.Tensor  # [num_layers, num_kv_heads, num_tokens, head_dim]
    values: torch.Tensor  # same shape as keys
    first_layer: int = 0  # global index of the first layer held (pipeline stages)
    # engine-private spare capacity that keys/values are views of; None for caches built elsewhere (always safe)
    buffer: KVBuffer | None = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[2])

    def clone(self) -> KVCache:
        """A private copy (no spare buffer) the engine may extend without touching this one."""
        return KVCache(keys=self.keys.clone(), values=self.values.clone(), first_layer=self.first_layer)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; greedy when temperature == 0."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrefillResult:
    logits: torch.Tensor  # [vocab] logits at the last prompt position (last stage only; hidden states otherwise)
    kv: KVCache


@dataclass(frozen=True)
class DecodeInput:
    token_id: int  # the last generated token, fed at position kv.num_tokens
    kv: KVCache


class EngineProtocol(Protocol):
    """A loaded model (or one pipeline stage of it) ready to run batched prefill and decode."""

    @property
    def weights_token(self) -> int:
        """Identity of the loaded weights; unchanged for the engine's lifetime (proves no reload happened)."""
        ...

    @property
    def max_context_tokens(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode_text(self, token_ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        """Run a batch of prompts of different lengths; return last-position logits and each request's KV."""
        ...

    def decode(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]:
        """One decode step for a batch of sequences at different context lengths; extends each KV in place."""
        ...
