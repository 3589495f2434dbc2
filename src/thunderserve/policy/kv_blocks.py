"""Paged KV memory as vLLM manages it: blocks of 16 tokens, admission by the prompt, preemption by recompute.

Pure decisions shared by the simulator (virtual time) and the runtime (real time):

* A sequence holds ceil(tokens in its KV cache / 16) blocks. Admission allocates the blocks of what it must
  prefill (the prompt, or prompt + generated tokens when it is recomputed); each decode step writes one more
  token per running sequence and takes a new block when the sequence's KV length crosses a block boundary.
* Scheduling never reads a request's output length: a request's future is unknown to the server. Requests
  wait (FIFO) when their prompt's blocks do not fit.
* When the running sequences' new blocks do not fit, the latest-admitted running sequence is preempted (vLLM
  v1, recompute mode): its blocks are freed and it goes back to the front of the waiting queue, where it will
  be prefilled again over its prompt and the tokens it had generated. The oldest sequence is not preempted
  when nothing else holds memory in the group: a group always makes progress (when even it does not fit, it
  runs over-committed, counted by the caller).
"""

from __future__ import annotations

from collections.abc import Iterable

BLOCK_TOKENS = 16  # vLLM's default block size on GPUs


def blocks_for(tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Blocks that hold `tokens` KV entries."""
    return -(-int(tokens) // block_tokens)


def block_capacity(kv_capacity_tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Whole blocks that fit in a group's KV memory."""
    return int(kv_capacity_tokens) // block_tokens


def needs_block(kv_tokens: int, block_tokens: int = BLOCK_TOKENS) -> bool:
    """Whether writing one more token to a sequence holding `kv_tokens` takes a new block."""
    return kv_tokens % block_tokens == 0


def preemptions(new_blocks: int, free_blocks: int, running: int,
                newest_first: Iterable[tuple[int, bool]], keep_one: bool = True) -> int:
    """How many of the latest-admitted running sequences to preempt so this step's new blocks fit.

    `new_blocks`: blocks the running sequences need for this step's tokens; `free_blocks`: blocks free now;
    `running`: sequences that could be preempted; `newest_first`: (blocks held, needs a new block this step)
    per sequence, latest-admitted first (read lazily, only as far as needed). Each victim frees its blocks and
    no longer needs its new one. With `keep_one` the oldest sequence is never preempted (the group must make
    progress); without it (other admitted requests will free or use memory, e.g. KV transfers in flight to a
    decode group) every sequence may be.
    """
    n = 0
    need, free = new_blocks, free_blocks
    if need <= free:
        return 0
    for held, wants in newest_first:
        if need <= free or n >= running - int(keep_one):
            break
        free += held
        need -= int(wants)
        n += 1
    return n
