"""Vectorised twins of the cost model's stage/group step times, with the serving mechanics on top.

`StagePerf` prices one batch per call; the estimate needs hundreds of batches per group (every sampled
prompt, every decode batch size), so these functions evaluate the very same step-time function on numpy arrays
(`costmodel.perf.StagePerf.step_time_s`, which accepts arrays). On top they model how a group runs its steps, as the simulator does (`sim.steptime`):
  * prefill batches flow stage by stage (pipelined): the next batch enters after the bottleneck stage time;
  * a decode step with PP > 1 splits the running batch into m = min(pp, batch) micro-batches circulating
    through the pipeline: every sequence gets a token per max(L, m·B) (L: pipeline latency of one
    micro-batch, B: its bottleneck-stage time);
  * a colocated (chunked-prefill) step is one pass over decode tokens and prefill chunks together, with the
    same micro-batching under PP.
Tests pin these against `costmodel.perf` and the simulator's step times.
"""

from __future__ import annotations

import numpy as np

from thunderserve.costmodel.comm import ALLREDUCE_LATENCY_S, SEND_LATENCY_S
from thunderserve.costmodel.perf import GroupPerf, StagePerf

ArrayLike = np.ndarray | float


def _allreduce_s(num_bytes: ArrayLike, tp: int, link_bytes_s: float) -> np.ndarray:
    nb = np.asarray(num_bytes, dtype=float)
    if tp <= 1:
        return np.zeros_like(nb)
    if link_bytes_s <= 0:
        return np.full_like(nb, np.inf)
    steps = 2 * (tp - 1)
    return steps * ALLREDUCE_LATENCY_S + steps / tp * nb / link_bytes_s


def sends_s(gp: GroupPerf, tokens: ArrayLike) -> np.ndarray:
    """Activation sends between consecutive stages for a pass over `tokens` tokens (summed)."""
    t = np.asarray(tokens, dtype=float)
    total = np.zeros_like(t)
    for sp, bw in zip(gp.stages, gp.send_bytes_s, strict=False):
        nbytes = t * sp.hidden_bytes_per_token
        if bw <= 0:
            total = total + np.where(nbytes > 0, np.inf, 0.0)
        else:
            total = total + np.where(nbytes > 0, SEND_LATENCY_S + nbytes / bw, 0.0)
    return total


def stage_prefill_s(sp: StagePerf, tokens: ArrayLike, sum_sq: ArrayLike, seqs: ArrayLike) -> np.ndarray:
    t = np.asarray(tokens, dtype=float)
    return np.asarray(sp.step_time_s(np.zeros_like(t), np.zeros_like(t), t, np.asarray(sum_sq, dtype=float),
                                     np.asarray(seqs, dtype=float) + np.zeros_like(t)))


def prefill_times_s(gp: GroupPerf, tokens: ArrayLike, sum_sq: ArrayLike, seqs: ArrayLike = 1.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(latency through all stages and sends, bottleneck stage time) of prefill batches, elementwise."""
    per_stage = [stage_prefill_s(sp, tokens, sum_sq, seqs) for sp in gp.stages]
    latency = np.sum(per_stage, axis=0) + sends_s(gp, tokens)
    return latency, np.max(per_stage, axis=0)


def stage_decode_s(sp: StagePerf, batch: ArrayLike, context_tokens: ArrayLike) -> np.ndarray:
    b = np.asarray(batch, dtype=float)
    ctx = np.asarray(context_tokens, dtype=float) + np.zeros_like(b)
    return np.asarray(sp.step_time_s(b, ctx, np.zeros_like(b), np.zeros_like(b), b))


def _pipelined(gp: GroupPerf, per_stage: list[np.ndarray], micro_tokens: np.ndarray, m: np.ndarray) -> np.ndarray:
    latency = np.sum(per_stage, axis=0) + sends_s(gp, micro_tokens)
    return np.maximum(latency, m * np.max(per_stage, axis=0))


def decode_step_s(gp: GroupPerf, batch: ArrayLike, context_tokens: ArrayLike) -> np.ndarray:
    """Time between two tokens of every running sequence at this batch size and total context (elementwise);
    with PP > 1 the batch runs as min(pp, batch) micro-batches (see the module docstring)."""
    b = np.asarray(batch, dtype=float)
    ctx = np.asarray(context_tokens, dtype=float)
    pp = len(gp.stages)
    if pp == 1:
        return stage_decode_s(gp.stages[0], b, ctx) + sends_s(gp, b)
    m = np.maximum(np.minimum(float(pp), b), 1.0)
    per_stage = [stage_decode_s(sp, b / m, ctx / m) for sp in gp.stages]
    return _pipelined(gp, per_stage, b / m, m)


def stage_mixed_s(sp: StagePerf, decode_batch: ArrayLike, decode_context_tokens: ArrayLike, chunk_tokens: ArrayLike,
                  chunk_attn_sq_tokens: ArrayLike, chunk_prefix_tokens: ArrayLike,
                  chunk_seqs_completing: ArrayLike) -> np.ndarray:
    """One stage pass over decode tokens plus prefill chunks (the simulator's `mixed_stage_time_s`)."""
    del chunk_prefix_tokens  # priced inside the prefill-attention term
    nd = np.asarray(decode_batch, dtype=float)
    c = np.asarray(chunk_tokens, dtype=float) + np.zeros_like(nd)
    nd = nd + np.zeros_like(c)
    return np.asarray(sp.step_time_s(nd, np.asarray(decode_context_tokens, dtype=float) + np.zeros_like(c), c,
                                     np.asarray(chunk_attn_sq_tokens, dtype=float) + np.zeros_like(c),
                                     nd + np.asarray(chunk_seqs_completing, dtype=float)))


def mixed_step_s(gp: GroupPerf, decode_batch: ArrayLike, decode_context_tokens: ArrayLike, chunk_tokens: ArrayLike,
                 chunk_attn_sq_tokens: ArrayLike, chunk_prefix_tokens: ArrayLike, chunk_seqs_completing: ArrayLike,
                 chunk_seqs: ArrayLike) -> np.ndarray:
    """One colocated step (decodes + chunks of `chunk_seqs` prompts); PP micro-batching as for decode."""
    nd = np.asarray(decode_batch, dtype=float)
    c = np.asarray(chunk_tokens, dtype=float)
    args = (decode_context_tokens, chunk_tokens, chunk_attn_sq_tokens, chunk_prefix_tokens, chunk_seqs_completing)
    pp = len(gp.stages)
    if pp == 1:
        return stage_mixed_s(gp.stages[0], nd, *args) + sends_s(gp, nd + c)
    m = np.maximum(np.minimum(float(pp), nd + np.asarray(chunk_seqs, dtype=float)), 1.0)
    per_stage = [stage_mixed_s(sp, nd / m, *(np.asarray(a, dtype=float) / m for a in args)) for sp in gp.stages]
    return _pipelined(gp, per_stage, (nd + c) / m, m)
