"""A fixed, deterministic subsample of a workload's (prompt, output) length pairs and its moments.

The analytic estimate evaluates every formula on these samples with numpy, so it uses the workload's real
(empirical) length distributions, tails included, at a fixed cost per evaluation. The sample is stratified
on the prompt length (pairs sorted by prompt, evenly spaced picks), so prompt quantiles are exact up to the
sample resolution and each prompt keeps its own output length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thunderserve.policy.kv_blocks import BLOCK_TOKENS
from thunderserve.spec.workload import WorkloadSpec

SAMPLE_SIZE = 512  # length pairs the estimate evaluates


@dataclass(frozen=True)
class LengthSample:
    """Length pairs (as floats) and the moments the queueing formulas need."""

    prompt_tokens: np.ndarray  # p_i
    output_tokens: np.ndarray  # o_i (>= 1); the first token comes from prefill
    decode_steps: np.ndarray  # m_i = o_i - 1 decode steps after the first token
    reserve_tokens: np.ndarray  # p_i + o_i: KV tokens a request holds at its end

    @property
    def size(self) -> int:
        return int(self.prompt_tokens.size)

    @property
    def mean_prompt_tokens(self) -> float:
        return float(self.prompt_tokens.mean())

    @property
    def mean_decode_steps(self) -> float:
        return float(self.decode_steps.mean())

    @property
    def token_weighted_prompt_tokens(self) -> float:
        """E[p^2]/E[p]: the mean prompt length seen by a random prompt *token* (chunked attention cost)."""
        return float((self.prompt_tokens ** 2).mean() / self.prompt_tokens.mean())

    @property
    def decode_context_tokens(self) -> float:
        """Mean KV context of a sequence in a decode batch (time-weighted by decode steps): E[m(p+o/2)]/E[m]."""
        m = self.decode_steps
        if m.sum() <= 0:
            return float(self.prompt_tokens.mean())
        return float((m * (self.prompt_tokens + self.output_tokens / 2)).sum() / m.sum())

    @property
    def decode_held_tokens(self) -> float:
        """Mean KV memory a sequence in a decode batch holds (time-weighted), in tokens: paged as vLLM pages it,
        it holds its context rounded up to whole blocks, E[m(p+o/2)]/E[m] plus half a block on average. No
        request's output length is known to the server; this is the workload's expectation."""
        return self.decode_context_tokens + BLOCK_TOKENS / 2


def length_sample(workload: WorkloadSpec, size: int = SAMPLE_SIZE) -> LengthSample:
    """Stratified subsample of `size` (prompt, output) pairs (all pairs when the trace is smaller)."""
    prompt = np.asarray(workload.prompt_tokens, dtype=np.float64)
    output = np.maximum(np.asarray(workload.output_tokens, dtype=np.float64), 1.0)
    order = np.argsort(prompt, kind="stable")
    if prompt.size > size:
        picks = order[np.round(np.linspace(0, prompt.size - 1, size)).astype(np.int64)]
    else:
        picks = order
    p, o = prompt[picks], output[picks]
    return LengthSample(prompt_tokens=p, output_tokens=o, decode_steps=o - 1.0, reserve_tokens=p + o)
