"""Step-time and memory model of one pipeline stage and one model-serving group.

A *stage* is a tensor-parallel set of GPUs holding a half-open layer range; a *group* is an ordered list of
stages covering all layers. Everything here is pure arithmetic on specs, fast enough to score thousands of
candidate plans: a `StagePerf` is built once per layout and then evaluates any batch in O(1).

One forward pass of a stage is priced by adding per-operation terms, the way Vidur composes measured kernels
(`StagePerf.step_time_s`, the one function the simulator, the planner's estimate and the fidelity report call):
  * linear layers (QKV, O, MLP, LM head): max(FLOPs / (tp x peak x eff(tokens)), weight bytes / (tp x bandwidth x
    memory_eff)), eff(tokens) = compute_eff x tokens / (tokens + compute_saturation_tokens) (GEMM tiles are padded
    when few rows are filled; fitted on measured GEMMs by `costmodel.calibration`);
  * prefill attention: 4·hidden·Σ(c·done + c²/2 + pad·c) FLOPs per layer for chunks of c tokens after `done`
    prefilled ones, at `attention_prefill_efficiency` of peak, + a fixed cost per layer (FlashAttention);
  * decode attention: the KV of every running sequence read at `attention_decode_memory_efficiency` of bandwidth,
    + a fixed cost per layer;
  * per-token element-wise kernels (norms, rotary, activation, residual adds): their bytes per token at
    `elementwise_memory_efficiency` of bandwidth;
  * TP all-reduces (two per layer, ring over the stage's slowest link), a fixed per-layer overhead (kernel launches
    and the element-wise kernels' fixed part) and a fixed per-step overhead.
A mixed (chunked-prefill) step is the sum of its parts: decodes' KV reads do not hide under the chunk's compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from thunderserve.costmodel.comm import ALLREDUCE_LATENCY_S, send_time_s
from thunderserve.spec.cluster import Cluster, GpuRef
from thunderserve.spec.model import ModelSpec

MEMORY_UTILIZATION = 0.90  # fraction of device memory usable (like vLLM's gpu_memory_utilization)
RUNTIME_OVERHEAD_BYTES = 1.0e9  # CUDA context, allocator slack, framework buffers, per GPU
ACTIVATION_TOKENS = 4096  # largest prefill chunk we reserve activation memory for
Num = Any  # a float, or a numpy array evaluated elementwise (the estimate's vectorised calls)


def elementwise_bytes_per_token(model: ModelSpec, tp: int) -> float:
    """Bytes one GPU moves per token and layer in the element-wise kernels (`elementwise_bytes`)."""
    return elementwise_bytes(model.hidden_size, model.num_heads, model.num_kv_heads, model.intermediate_size, tp,
                             model.dtype_bytes)


def elementwise_bytes(hidden: float, num_heads: float, num_kv_heads: float, intermediate: float, tp: float,
                      dtype_bytes: float = 2.0) -> Any:
    """Read + write bytes per token and layer on one GPU: two norms (2·hidden each), two residual adds
    (3·hidden each), rotary on the local q and k heads, the gated activation (reads gate and up, writes one;
    sharded by TP). Works on numpy arrays too."""
    head_dim = hidden / num_heads
    q_k = (num_heads + num_kv_heads) * head_dim / tp
    return dtype_bytes * (10 * hidden + 2 * q_k + 3 * intermediate / tp)


def roofline_time_s(flops: float, mem_bytes: float, tokens: float, flops_s: float, mem_bytes_s: float,
                    compute_saturation_tokens: float = 0.0) -> float:
    """max(compute, memory) time of a pass over `tokens` rows; the one roofline shared with calibration.

    Compute runs at `flops_s` x tokens / (tokens + compute_saturation_tokens): small batches leave GEMM tiles
    partly empty, so they cost as if `compute_saturation_tokens` more rows were present.
    """
    compute = flops / flops_s
    if compute_saturation_tokens > 0.0 and tokens > 0.0:
        compute *= (tokens + compute_saturation_tokens) / tokens
    return max(compute, mem_bytes / mem_bytes_s)


@dataclass(frozen=True)
class StagePerf:
    """Precomputed cost coefficients of one stage (units in names)."""

    num_layers: int
    tp: int
    flops_s: float  # effective FLOP/s of the whole stage (slowest GPU x tp)
    mem_bytes_s: float  # effective memory bandwidth of the whole stage
    link_bytes_s: float  # slowest link inside the stage (TP all-reduce)
    overhead_s: float  # fixed cost per forward pass (per-layer overheads summed)
    weight_bytes: float  # weights held by the stage in total (all shards)
    streamed_weight_bytes: float  # weights read per forward pass (layers + LM head; not the embedding table)
    lm_head_flops_per_seq: float  # 2 x vocab x hidden on the last stage (logits for one position), else 0
    kv_capacity_tokens: int  # tokens of KV the stage can hold (bounded by its tightest GPU)
    max_gpu_used_bytes: float  # weights + activations + overhead on the fullest GPU
    min_gpu_capacity_bytes: float  # usable memory of the smallest GPU
    linear_flops_per_token: float  # 2 x params of the layers held
    attn_prefill_flops_per_sq_token: float  # causal attention FLOPs per Σlen²
    attn_decode_flops_per_ctx_token: float  # attention FLOPs per context token at decode
    kv_bytes_per_token: float  # KV bytes per token over the stage's layers (all shards)
    hidden_bytes_per_token: float  # activation bytes per token (all-reduced in TP, sent to the next stage)
    compute_saturation_tokens: float = 0.0  # tokens at which compute efficiency is half its peak value
    attn_prefill_flops_s: float = float("inf")  # FLOP/s prefill attention reaches on the stage (all GPUs)
    attn_pad_tokens: float = 0.0  # extra key positions per query token (FlashAttention tile waste)
    attn_prefill_overhead_s: float = 0.0  # fixed cost of the prefill-attention kernels of the stage per step
    attn_decode_bytes_s: float = float("inf")  # KV bytes/s decode attention reads on the stage (all GPUs)
    attn_decode_overhead_s: float = 0.0  # fixed cost of the decode-attention kernels of the stage per step
    elementwise_s_per_token: float = 0.0  # norms, rotary, activation and adds over the stage's layers
    step_overhead_s: float = 0.0  # fixed cost of one forward pass (scheduling, sampling)

    @property
    def fits(self) -> bool:
        return self.kv_capacity_tokens > 0

    def linear_time_s(self, tokens: Num, logits_seqs: Num) -> Num:
        """Linear layers (+ LM head for `logits_seqs` sequences) over `tokens` rows: the GEMM roofline."""
        compute = (tokens * self.linear_flops_per_token + logits_seqs * self.lm_head_flops_per_seq) / self.flops_s
        if self.compute_saturation_tokens > 0.0:
            compute = compute * (tokens + self.compute_saturation_tokens) / _at_least_one(tokens)
        memory = self.streamed_weight_bytes / self.mem_bytes_s
        return np.maximum(compute, memory) if isinstance(compute, np.ndarray) else max(compute, memory)

    def step_time_s(self, decode_batch: Num, decode_context_tokens: Num, chunk_tokens: Num,
                    chunk_attn_sq_tokens: Num, logits_seqs: Num) -> Num:
        """One forward pass of the stage over `decode_batch` decode tokens (holding `decode_context_tokens` of KV)
        plus prefill chunks of `chunk_tokens` in all; the sum of per-operation terms (module docstring).

        `chunk_attn_sq_tokens` = Σ(c² + 2·c·done) over chunks of c tokens after `done` prefilled ones;
        `logits_seqs`: sequences that need logits (decodes and chunks that end their prompt). Works elementwise
        on numpy arrays too (the estimate's vectorised callers).
        """
        tokens = decode_batch + chunk_tokens
        attn_prefill = (((chunk_attn_sq_tokens + 2.0 * self.attn_pad_tokens * chunk_tokens)
                         * self.attn_prefill_flops_per_sq_token / self.attn_prefill_flops_s)
                        + (chunk_tokens > 0) * self.attn_prefill_overhead_s)
        attn_decode = (decode_context_tokens * self.kv_bytes_per_token / self.attn_decode_bytes_s
                       + (decode_batch > 0) * self.attn_decode_overhead_s)
        comm = 0.0
        if self.tp > 1:  # two ring all-reduces per layer (after attention and after the MLP)
            steps = 2 * (self.tp - 1)
            per = (steps * ALLREDUCE_LATENCY_S + steps / self.tp * tokens * self.hidden_bytes_per_token
                   / self.link_bytes_s) if self.link_bytes_s > 0 else float("inf")
            comm = 2 * self.num_layers * per
        return (self.linear_time_s(tokens, logits_seqs) + attn_prefill + attn_decode
                + tokens * self.elementwise_s_per_token + comm + self.overhead_s + self.step_overhead_s)

    def prefill_time_s(self, total_tokens: float, sum_sq_tokens: float, num_seqs: float = 1.0) -> float:
        """One forward pass over a batch of `num_seqs` prompts: Σlen tokens and Σlen² for attention."""
        return self.step_time_s(0.0, 0.0, total_tokens, sum_sq_tokens, num_seqs)

    def decode_time_s(self, batch_size: float, total_context_tokens: float) -> float:
        """One decode step for `batch_size` sequences holding `total_context_tokens` of KV in all."""
        return self.step_time_s(batch_size, total_context_tokens, 0.0, 0.0, batch_size)


def _at_least_one(x: Num) -> Num:
    return np.maximum(x, 1.0) if isinstance(x, np.ndarray) else max(x, 1.0)


@dataclass(frozen=True)
class GroupPerf:
    """Cost of a whole group: stages in order plus the activation sends between them."""

    stages: tuple[StagePerf, ...]
    send_bytes_s: tuple[float, ...]  # link between stage i and i+1 (len = stages - 1)

    @property
    def kv_capacity_tokens(self) -> int:
        return min(s.kv_capacity_tokens for s in self.stages)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def _sends(self, tokens: float) -> float:
        return sum(send_time_s(tokens * s.hidden_bytes_per_token, bw)
                   for s, bw in zip(self.stages, self.send_bytes_s, strict=False))

    def prefill_time_s(self, total_tokens: float, sum_sq_tokens: float, num_seqs: float = 1.0) -> float:
        """Latency of a prefill batch through all stages."""
        return (sum(s.prefill_time_s(total_tokens, sum_sq_tokens, num_seqs) for s in self.stages)
                + self._sends(total_tokens))

    def prefill_stage_max_s(self, total_tokens: float, sum_sq_tokens: float, num_seqs: float = 1.0) -> float:
        """Bottleneck stage time: with pipelining, batches leave at this interval."""
        return max(s.prefill_time_s(total_tokens, sum_sq_tokens, num_seqs) for s in self.stages)

    def decode_time_s(self, batch_size: float, total_context_tokens: float) -> float:
        """Latency of one decode step through all stages (the TPOT of every sequence in the batch)."""
        return sum(s.decode_time_s(batch_size, total_context_tokens) for s in self.stages) + self._sends(batch_size)

    def prefill_latency_s(self, prompt_tokens: Sequence[int]) -> float:
        """Convenience: latency of one prefill batch given each prompt's length."""
        total = float(sum(prompt_tokens))
        return self.prefill_time_s(total, float(sum(p * p for p in prompt_tokens)), float(len(prompt_tokens)))

    def decode_step_latency_s(self, context_tokens: Sequence[int]) -> float:
        """Convenience: one decode step for sequences at the given context lengths."""
        return self.decode_time_s(float(len(context_tokens)), float(sum(context_tokens)))


def stage_perf(model: ModelSpec, gpus: Sequence[GpuRef], num_layers: int, cluster: Cluster, *,
               first: bool, last: bool) -> StagePerf:
    """Build the cost coefficients of a stage holding `num_layers` layers on a TP set of `gpus`."""
    tp = len(gpus)
    flops_s = tp * min(g.spec.fp16_tflops * 1e12 * g.spec.compute_efficiency for g in gpus)
    mem_bytes_s = tp * min(g.spec.memory_bandwidth_gbs * 1e9 * g.spec.memory_efficiency for g in gpus)
    link = min((cluster.bandwidth_bytes_s(a, b) for a in gpus for b in gpus if a is not b), default=float("inf"))
    overhead = num_layers * max(g.spec.layer_overhead_us for g in gpus) * 1e-6
    d = model.dtype_bytes
    emb = model.vocab_size * model.hidden_size * d
    weights = num_layers * model.layer_weight_bytes
    extra = 0.0
    if first:
        extra += emb
    if last and (not model.tie_word_embeddings or not first):
        extra += emb
    weights_total = weights + extra
    lm_head_bytes = emb if last else 0.0
    shards = min(tp, model.num_kv_heads)
    kv_per_token = model.kv_bytes_per_token_per_layer * num_layers
    kv_per_token_per_gpu = kv_per_token / shards
    act = ACTIVATION_TOKENS * (4 * model.hidden_size + 2 * model.intermediate_size / tp) * d
    used = weights_total / tp + act + RUNTIME_OVERHEAD_BYTES
    cap = min(g.spec.memory_gb * 1e9 * MEMORY_UTILIZATION for g in gpus)
    free = cap - used
    kv_tokens = int(free // kv_per_token_per_gpu) if free > 0 and kv_per_token_per_gpu > 0 else 0
    h = model.hidden_size
    peak_flops_s = tp * min(g.spec.fp16_tflops * 1e12 * g.spec.attention_prefill_efficiency for g in gpus)
    kv_read_bytes_s = tp * min(g.spec.memory_bandwidth_gbs * 1e9 * g.spec.attention_decode_memory_efficiency
                               for g in gpus)
    elementwise_bytes_s = min(g.spec.memory_bandwidth_gbs * 1e9 * g.spec.elementwise_memory_efficiency for g in gpus)
    return StagePerf(
        num_layers=num_layers,
        tp=tp,
        flops_s=flops_s,
        mem_bytes_s=mem_bytes_s,
        link_bytes_s=link,
        overhead_s=overhead,
        weight_bytes=weights_total,
        streamed_weight_bytes=weights + lm_head_bytes,
        lm_head_flops_per_seq=2.0 * emb / d if last else 0.0,
        kv_capacity_tokens=kv_tokens,
        max_gpu_used_bytes=used,
        min_gpu_capacity_bytes=cap,
        linear_flops_per_token=2.0 * model.params_per_layer * num_layers,
        attn_prefill_flops_per_sq_token=2.0 * h * num_layers,
        attn_decode_flops_per_ctx_token=4.0 * h * num_layers,
        kv_bytes_per_token=float(kv_per_token),
        hidden_bytes_per_token=float(h * d),
        compute_saturation_tokens=max(g.spec.compute_saturation_tokens for g in gpus),
        attn_prefill_flops_s=peak_flops_s,
        attn_pad_tokens=max(g.spec.attention_pad_tokens for g in gpus),
        attn_prefill_overhead_s=num_layers * max(g.spec.attention_prefill_overhead_us for g in gpus) * 1e-6,
        attn_decode_bytes_s=kv_read_bytes_s,
        attn_decode_overhead_s=num_layers * max(g.spec.attention_decode_overhead_us for g in gpus) * 1e-6,
        elementwise_s_per_token=num_layers * elementwise_bytes_per_token(model, tp) / elementwise_bytes_s,
        step_overhead_s=max(g.spec.step_overhead_us for g in gpus) * 1e-6,
    )


def group_perf(model: ModelSpec, stages: Sequence[tuple[Sequence[GpuRef], int]], cluster: Cluster) -> GroupPerf:
    """Build a group's cost from (gpus, num_layers) per stage, in pipeline order."""
    n = len(stages)
    perfs = tuple(stage_perf(model, g, layers, cluster, first=i == 0, last=i == n - 1)
                  for i, (g, layers) in enumerate(stages))
    sends = tuple(cluster.min_bandwidth_bytes_s(list(stages[i][0]), list(stages[i + 1][0])) for i in range(n - 1))
    return GroupPerf(perfs, sends)
