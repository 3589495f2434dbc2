"""Continuous-batching state of a decode or colocated group, with KV memory paged as vLLM pages it.

Memory (decisions in `policy.kv_blocks`): a request admitted to the group allocates the blocks of what it must
prefill (its prompt; prompt + generated tokens when it is recomputed after a preemption). Each decode step
takes one new block for every running sequence whose KV length crosses a 16-token boundary. When those do not
fit, the latest-admitted sequences are preempted (their blocks freed; the group puts them back at the front of
its queue to recompute). Nothing here reads a request's output length to decide: it is only used to know when
a sequence ends (the simulator's stand-in for the end-of-sequence token).

Cost per event, not per token: sequences needing a new block at step s are those with (join step - KV length
at join) ≡ s (mod 16), counted per residue; finishes come from a heap keyed by the step index that ends them
(entries of preempted sequences are skipped when popped); the context held by the batch is a running sum.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING

from thunderserve.policy.kv_blocks import BLOCK_TOKENS, block_capacity, blocks_for, preemptions
from thunderserve.sim.steptime import GroupTimer

if TYPE_CHECKING:
    from thunderserve.sim.replay import _Replay


class _DecodeLoop(ABC):
    """Continuous-batching decode state shared by decode and colocated groups (see module docstring)."""

    def __init__(self, sim: _Replay, idx: int, timer: GroupTimer, kv_capacity_tokens: int) -> None:
        self.sim = sim
        self.idx = idx
        self.timer = timer
        self.kv_cap = kv_capacity_tokens
        self.used_blocks = 0  # KV blocks held by admitted requests (prefilling, in transfer or running)
        self.running = 0
        self.ctx = 0  # KV tokens held by the running sequences
        self.step_idx = 0  # decode steps run so far
        self.fin: list[tuple[int, int]] = []  # (index of the step that ends the request, request); lazy
        self.info: dict[int, tuple[int, int, int]] = {}  # running request -> (join step, KV tokens at join, end)
        self.bucket = [0] * BLOCK_TOKENS  # running sequences by the step residue at which they take a block
        self.adm: dict[int, tuple[int, int]] = {}  # admitted request -> (admission number, blocks at admission)
        self.stack: list[tuple[int, int]] = []  # (admission number, request), admission order; lazy
        self.seq = 0
        self.over: set[int] = set()  # requests counted as over-committing this group's memory
        self.stepping = False  # a step (or the decision to run one) is scheduled

    @property
    def total_blocks(self) -> int:
        return block_capacity(self.kv_cap)

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    def prefill_tokens(self, r: int) -> int:
        """Tokens request r must prefill here: its prompt, plus what it had generated when recomputed."""
        req = self.sim.req
        return req.prompt[r] + req.gen[r]

    def admit(self, r: int) -> int:
        """Allocate the blocks of request r's prefill; returns its prefill tokens."""
        tokens = self.prefill_tokens(r)
        blocks = blocks_for(tokens)
        if blocks > self.total_blocks and r not in self.over:
            self.over.add(r)
            self.sim.oversized += 1
        self.used_blocks += blocks
        self.seq += 1
        self.adm[r] = (self.seq, blocks)
        self.stack.append((self.seq, r))
        return tokens

    def release(self, r: int) -> None:
        """Free an admitted request's blocks held since admission (it ended without decoding here)."""
        self.used_blocks -= self.adm.pop(r)[1]

    def join(self, r: int) -> None:
        """Request r joins the running batch, prefilled over its prompt and the `gen` tokens it had generated
        before (0 unless recomputed): its KV holds those, it has produced gen + 1 tokens, o - gen - 1 to go."""
        req = self.sim.req
        kv0 = req.prompt[r] + req.gen[r]
        end = self.step_idx + req.output[r] - req.gen[r] - 2
        self.info[r] = (self.step_idx, kv0, end)
        self.bucket[(self.step_idx - kv0) % BLOCK_TOKENS] += 1
        self.ctx += kv0
        heapq.heappush(self.fin, (end, r))
        self.running += 1

    def _kv_tokens(self, r: int) -> int:
        j0, kv0, _ = self.info[r]
        return kv0 + self.step_idx - j0

    def grow(self) -> bool:
        """Allocate this decode step's new blocks, preempting latest-admitted sequences when they do not fit.
        Returns whether any request was preempted."""
        need = self.bucket[self.step_idx % BLOCK_TOKENS]
        if need <= self.total_blocks - self.used_blocks:  # the common case, decided without the policy call
            self.used_blocks += need
            return False
        seen: list[int] = []
        n = preemptions(need, self.free_blocks, self.preemptible(), self._newest_first(seen), self.keep_one())
        for r in seen[:n]:
            need -= self.preempt(r)
        if need > self.free_blocks:  # the one sequence left outgrows the whole memory: it runs over-committed
            for r in self.info:
                if r not in self.over:
                    self.over.add(r)
                    self.sim.oversized += 1
        self.used_blocks += need
        return n > 0

    def keep_one(self) -> bool:
        """Whether the oldest sequence must be kept (nothing else in the group will free memory)."""
        return True

    def preemptible(self) -> int:
        """Sequences a preemption may pick (running, or prefilling / recomputing here)."""
        return self.running

    def _newest_first(self, seen: list[int]) -> Iterator[tuple[int, bool]]:
        """(blocks held, needs a block this step) of preemptible requests, latest-admitted first; appends each
        request to `seen` as it is read."""
        stack = self.stack
        while stack and self.adm.get(stack[-1][1], (0,))[0] != stack[-1][0]:
            stack.pop()  # finished or preempted since
        for i in range(len(stack) - 1, -1, -1):
            s, r = stack[i]
            if self.adm.get(r, (0,))[0] != s:
                continue
            if r in self.info:
                kv = self._kv_tokens(r)
                seen.append(r)
                yield blocks_for(kv), kv % BLOCK_TOKENS == 0
            elif self.is_prefilling(r):
                seen.append(r)
                yield self.adm[r][1], False

    def is_prefilling(self, r: int) -> bool:
        """Whether admitted request r is being prefilled / recomputed here (a subclass says)."""
        return False

    def preempt(self, r: int) -> int:
        """Free request r's blocks and take it out of the batch (the subclass re-queues it). Returns 1 if it
        needed a new block this step (that block is no longer needed), else 0."""
        self.sim.preemptions += 1
        self.adm.pop(r)
        if r not in self.info:
            self.used_blocks -= blocks_for(self.prefill_tokens(r))
            self.drop_prefill(r)
            return 0
        kv = self._kv_tokens(r)
        j0, kv0, _ = self.info.pop(r)
        self.bucket[(j0 - kv0) % BLOCK_TOKENS] -= 1
        self.used_blocks -= blocks_for(kv)
        self.ctx -= kv
        self.running -= 1
        req = self.sim.req
        req.gen[r] = kv - req.prompt[r] + 1  # tokens produced so far: recomputed with the prompt
        self.requeue_front(r)
        return int(kv % BLOCK_TOKENS == 0)

    @abstractmethod
    def drop_prefill(self, r: int) -> None:
        """Take a prefilling request out and re-queue it at the front."""

    @abstractmethod
    def requeue_front(self, r: int) -> None:
        """Put a preempted request back at the front of the queue."""

    def end_decode_step(self) -> bool:
        """Account one decode step of the running batch; returns whether KV memory was freed."""
        self.ctx += self.running
        fin = self.fin
        step = self.step_idx
        freed = False
        if fin and fin[0][0] <= step:
            sim = self.sim
            now = sim.loop.now_s
            info = self.info
            while fin and fin[0][0] <= step:
                end, r = heapq.heappop(fin)
                got = info.get(r)
                if got is None or got[2] != end:
                    continue  # preempted since (its entry for the new run is elsewhere in the heap)
                j0, kv0, _ = info.pop(r)
                kv = kv0 + step + 1 - j0
                self.bucket[(j0 - kv0) % BLOCK_TOKENS] -= 1
                self.running -= 1
                self.ctx -= kv
                self.used_blocks -= blocks_for(kv)
                del self.adm[r]
                sim.finish(r, now)
                freed = True
        self.step_idx = step + 1
        return freed
