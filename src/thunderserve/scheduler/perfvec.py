"""Vectorised twins of the cost model's stage/group times (`costmodel.perf`), plus the mixed step.

`StagePerf`/`GroupPerf` price one batch per call; the estimate needs hundreds of batches per group (every
sampled prompt, every decode batch size), so these functions evaluate the very same formulas on numpy
arrays. `mixed_step_time_s` prices a vLLM-style chunked-prefill step (decodes plus prefill chunks in one
forward pass), which the cost model has no single call for; it composes the same terms. Tests pin the
scalar cases against `costmodel.perf`.
"""

from __future__ import annotations

import numpy as np

from thunderserve.costmodel.comm import ALLREDUCE_LATENCY_S, SEND_LATENCY_S
from thunderserve.costmodel.perf import GroupPerf, StagePerf

ArrayLike = np.ndarray | float


def _allreduce_s(num_bytes: ArrayLike, tp: int, link_bytes_s: float) -> ArrayLike:
    if tp <= 1:
        return 0.0 * np.asarray(num_bytes)
    if link_bytes_s <= 0:
        return np.full_like(np.asarray(num_bytes, dtype=float), np.inf)
    steps = 2 * (tp - 1)
    return steps * ALLREDUCE_LATENCY_S + steps / tp * np.asarray(num_bytes) / link_bytes_s


def stage_time_s(sp: StagePerf, tokens: ArrayLike, flops: ArrayLike, mem_bytes: ArrayLike) -> np.ndarray:
    """`StagePerf._time` on arrays: max(compute, memory) + TP all-reduces + fixed overhead."""
    compute = np.asarray(flops) / sp.flops_s
    memory = np.asarray(mem_bytes) / sp.mem_bytes_s
    comm = 2 * sp.num_layers * _allreduce_s(np.asarray(tokens) * sp.hidden_bytes_per_token, sp.tp,
                                            sp.link_bytes_s) if sp.tp > 1 else 0.0
    return np.maximum(compute, memory) + comm + sp.overhead_s


def _sends_s(gp: GroupPerf, tokens: ArrayLike) -> ArrayLike:
    total: ArrayLike = 0.0
    t = np.asarray(tokens, dtype=float)
    for sp, bw in zip(gp.stages, gp.send_bytes_s, strict=False):
        nbytes = t * sp.hidden_bytes_per_token
        if bw <= 0:
            total = total + np.where(nbytes > 0, np.inf, 0.0)
        else:
            total = total + np.where(nbytes > 0, SEND_LATENCY_S + nbytes / bw, 0.0)
    return total


def stage_prefill_s(sp: StagePerf, tokens: ArrayLike, sum_sq: ArrayLike, seqs: ArrayLike) -> np.ndarray:
    flops = (np.asarray(tokens) * sp.linear_flops_per_token + np.asarray(sum_sq) * sp.attn_prefill_flops_per_sq_token
             + np.asarray(seqs) * sp.lm_head_flops_per_seq)
    mem = sp.streamed_weight_bytes + np.asarray(tokens) * sp.kv_bytes_per_token
    return stage_time_s(sp, tokens, flops, mem)


def prefill_times_s(gp: GroupPerf, tokens: ArrayLike, sum_sq: ArrayLike, seqs: ArrayLike = 1.0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(latency through all stages, bottleneck stage time) of prefill batches, elementwise."""
    per_stage = [stage_prefill_s(sp, tokens, sum_sq, seqs) for sp in gp.stages]
    latency = np.sum(per_stage, axis=0) + _sends_s(gp, tokens)
    return latency, np.max(per_stage, axis=0)


def decode_step_s(gp: GroupPerf, batch: ArrayLike, context_tokens: ArrayLike) -> np.ndarray:
    """One decode step (`GroupPerf.decode_time_s`) for batch sizes and total context tokens, elementwise."""
    b = np.asarray(batch, dtype=float)
    ctx = np.asarray(context_tokens, dtype=float)
    total = _sends_s(gp, b)
    for sp in gp.stages:
        flops = b * (sp.linear_flops_per_token + sp.lm_head_flops_per_seq) + ctx * sp.attn_decode_flops_per_ctx_token
        mem = sp.streamed_weight_bytes + ctx * sp.kv_bytes_per_token
        total = total + stage_time_s(sp, b, flops, mem)
    return np.asarray(total, dtype=float)


def mixed_step_time_s(gp: GroupPerf, num_decode: ArrayLike, decode_context_tokens: ArrayLike,
                      prefill_tokens: ArrayLike, prefill_sum_sq: ArrayLike, prefill_seqs: ArrayLike
                      ) -> np.ndarray:
    """One chunked-prefill step: `num_decode` sequences take a token each and `prefill_tokens` prompt tokens
    (attention as `prefill_sum_sq` equivalent Σlen², `prefill_seqs` prompts finishing, which need logits)
    ride along in the same forward pass of every stage.
    """
    n = np.asarray(num_decode, dtype=float)
    c = np.asarray(prefill_tokens, dtype=float)
    tokens = n + c
    total = _sends_s(gp, tokens)
    for sp in gp.stages:
        flops = (tokens * sp.linear_flops_per_token + np.asarray(prefill_sum_sq) * sp.attn_prefill_flops_per_sq_token
                 + np.asarray(decode_context_tokens) * sp.attn_decode_flops_per_ctx_token
                 + (n + np.asarray(prefill_seqs)) * sp.lm_head_flops_per_seq)
        mem = sp.streamed_weight_bytes + (np.asarray(decode_context_tokens) + c) * sp.kv_bytes_per_token
        total = total + stage_time_s(sp, tokens, flops, mem)
    return np.asarray(total, dtype=float)
