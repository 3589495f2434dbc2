"""Batching and admission decisions shared by the simulator (virtual time) and the runtime (real time).

All functions are pure: they take queue contents as token counts and return how many requests (a FIFO
prefix) or which chunk sizes to run next. Admission sizes are whatever KV tokens the caller reserves per
request: the simulator passes each request's prompt rounded up to whole KV blocks and grows memory block by
block with preemption (`policy.kv_blocks`); the runtime's workers still reserve prompt + requested max tokens.
Requests that do not fit wait at the head of the queue (backpressure, never a drop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_PREFILL_TOKEN_BUDGET = 4096  # max prompt tokens in one prefill batch (a long prompt runs alone)
DEFAULT_MAX_BATCH_SIZE = 256  # max sequences in one decode batch
DEFAULT_CHUNK_TOKEN_BUDGET = 2048  # vLLM-style chunked prefill: tokens per mixed step


@dataclass(frozen=True)
class BatchingConfig:
    prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    chunk_token_budget: int = DEFAULT_CHUNK_TOKEN_BUDGET


def select_prefill_batch(queued_prompt_tokens: Sequence[int], token_budget: int, kv_free_tokens: float,
                         max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> int:
    """How many queued prompts (FIFO prefix) to prefill together.

    Takes prompts while their total stays within `token_budget` (the first one always goes, however long,
    if its KV fits) and within the free KV memory. Returns 0 when the head does not fit in KV memory.
    """
    total = 0
    n = 0
    for tokens in queued_prompt_tokens:
        if n >= max_batch_size:
            break
        if total + tokens > kv_free_tokens:
            break
        if n > 0 and total + tokens > token_budget:
            break
        total += tokens
        n += 1
    return n


def admit_decodes(waiting_reserve_tokens: Sequence[int], kv_free_tokens: float, running: int,
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> int:
    """How many waiting sequences (FIFO prefix) join the decode batch, each reserving its KV tokens."""
    n = 0
    free = kv_free_tokens
    for tokens in waiting_reserve_tokens:
        if running + n >= max_batch_size or tokens > free:
            break
        free -= tokens
        n += 1
    return n


def plan_chunked_step(num_decoding: int, prefill_remaining_tokens: Sequence[int], token_budget: int
                      ) -> list[int]:
    """vLLM-style mixed step: every running decode takes one token, prefill chunks fill the rest.

    Returns the chunk size for each queued prefill (FIFO order, stops at the first zero). Decodes are never
    starved: they are scheduled first, as in vLLM's chunked-prefill scheduler.
    """
    left = max(token_budget - num_decoding, 0)
    chunks: list[int] = []
    for remaining in prefill_remaining_tokens:
        if left <= 0:
            break
        take = min(remaining, left)
        chunks.append(take)
        left -= take
    return chunks
