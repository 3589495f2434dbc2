"""What each kind of group runs next: prefill batches, decode admission, colocated (mixed) steps.

Pure decisions over queue contents given as token counts, built on `policy.batching`; the simulator calls
them in virtual time and the runtime in real time. Two rules are added on top of the batching primitives:

* Progress guarantee: a request whose KV alone exceeds a group's whole KV capacity would block its queue
  forever; when the group holds nothing else it runs alone (over-committed, counted by the caller) instead.
  Such requests are rare (the longest trace requests on the smallest groups), so this changes no decision
  for the others and keeps "requests wait, never dropped" true.
* Colocated groups admit a request when its prompt's KV blocks fit (the simulator passes block-rounded
  prefill tokens as the `*_reserve_tokens` arguments; growth and preemption: `policy.kv_blocks`), then either run
  vLLM's chunked-prefill step (decodes first, prefill chunks fill the token budget) or the older
  prefill-first step (a prefill batch whenever one can be admitted, decode steps otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from thunderserve.policy.batching import (
    BatchingConfig,
    admit_decodes,
    plan_chunked_step,
    select_prefill_batch,
)


class ColocatedPolicy(StrEnum):
    CHUNKED = "chunked"  # vLLM >= 0.4 default: chunked prefill mixed into decode steps
    PREFILL_FIRST = "prefill_first"  # older vLLM: whole prefills pause decoding


def prefill_batch_size(queued_prompt_tokens: Sequence[int], kv_free_tokens: float, kv_capacity_tokens: float,
                       config: BatchingConfig = BatchingConfig()) -> int:
    """Prompts (FIFO prefix) a prefill group runs next; an oversized head runs alone on an empty group."""
    n = select_prefill_batch(queued_prompt_tokens, config.prefill_token_budget, kv_free_tokens,
                             config.max_batch_size)
    if n == 0 and queued_prompt_tokens and kv_free_tokens >= kv_capacity_tokens:
        return 1
    return n


def decode_admissions(waiting_reserve_tokens: Sequence[int], kv_free_tokens: float, kv_capacity_tokens: float,
                      active: int, config: BatchingConfig = BatchingConfig()) -> int:
    """Waiting sequences (FIFO prefix) whose KV reservation fits and join; oversized head alone when idle.

    `active` counts sequences already holding a reservation (running, joining or in transfer).
    """
    n = admit_decodes(waiting_reserve_tokens, kv_free_tokens, active, config.max_batch_size)
    if n == 0 and waiting_reserve_tokens and active == 0 and kv_free_tokens >= kv_capacity_tokens:
        return 1
    return n


@dataclass(frozen=True)
class ColocatedStep:
    """One step of a colocated group."""

    admit: int  # waiting requests (FIFO prefix) admitted now, each allocating its prompt's KV blocks
    prefill_chunks: tuple[int, ...]  # tokens processed per prefilling request, FIFO: already admitted first,
    #                                  then the newly admitted ones
    decode: bool  # whether the running decodes take one token in this step

    @property
    def idle(self) -> bool:
        return not self.prefill_chunks and not self.decode


def colocated_step(policy: ColocatedPolicy | str, num_decoding: int, prefill_remaining_tokens: Sequence[int],
                   waiting_prompt_tokens: Sequence[int], waiting_reserve_tokens: Sequence[int],
                   kv_free_tokens: float, kv_capacity_tokens: float,
                   config: BatchingConfig = BatchingConfig()) -> ColocatedStep:
    """Next step of a group that runs both phases.

    `prefill_remaining_tokens`: prompt tokens still to prefill for admitted requests (FIFO);
    `waiting_*`: prompt tokens and KV reservations of the not yet admitted requests (FIFO; a bounded head is
    enough: at most `config.max_batch_size` entries are looked at).
    """
    active = num_decoding + len(prefill_remaining_tokens)
    admit = decode_admissions(waiting_reserve_tokens, kv_free_tokens, kv_capacity_tokens, active, config)
    if policy == ColocatedPolicy.PREFILL_FIRST:
        if admit > 0:
            n = select_prefill_batch(waiting_prompt_tokens[:admit], config.prefill_token_budget,
                                     float("inf"), config.max_batch_size)
            return ColocatedStep(admit=n, prefill_chunks=tuple(waiting_prompt_tokens[:n]), decode=False)
        return ColocatedStep(admit=0, prefill_chunks=(), decode=num_decoding > 0)
    wanted = list(prefill_remaining_tokens) + list(waiting_prompt_tokens[:admit])
    chunks = plan_chunked_step(num_decoding, wanted, config.chunk_token_budget)
    # Only requests that get a chunk in this step are admitted (vLLM admits into the token budget).
    admitted = max(len(chunks) - len(prefill_remaining_tokens), 0)
    return ColocatedStep(admit=admitted, prefill_chunks=tuple(chunks), decode=num_decoding > 0)
