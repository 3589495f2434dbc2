"""Roofline latency and memory model of one pipeline stage and one model-serving group.

A *stage* is a tensor-parallel set of GPUs holding a half-open layer range; a *group* is an ordered list of
stages covering all layers. Everything here is pure arithmetic on specs, fast enough to score thousands of
candidate plans: a `StagePerf` is built once per layout and then evaluates any batch in O(1).

Latency of one forward pass of a stage (per layer, summed over its layers):
    max(FLOPs / (tp x min peak x compute_eff), bytes / (tp x min bandwidth x memory_eff))
    + TP all-reduce (two per layer, ring over the stage's slowest link) + fixed per-layer overhead
compute_eff saturates with the batch's token count (GEMM tiles are padded when few rows are filled):
    eff(tokens) = compute_eff x tokens / (tokens + compute_saturation_tokens)   (see `roofline_time_s`;
    the factors are fitted on measured GEMM latencies by `costmodel.calibration`).
FLOPs: 2 x tokens x params_per_layer + attention (prefill 2·Σlen²·hidden causal, decode 4·Σctx·hidden)
       + the LM head (2·vocab·hidden) once per sequence on the last stage.
Bytes: weights of the layers (+ LM head on the last stage) + KV written (prefill) or read (decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from thunderserve.costmodel.comm import allreduce_time_s, send_time_s
from thunderserve.spec.cluster import Cluster, GpuRef
from thunderserve.spec.model import ModelSpec

MEMORY_UTILIZATION = 0.90  # fraction of device memory usable (like vLLM's gpu_memory_utilization)
RUNTIME_OVERHEAD_BYTES = 1.0e9  # CUDA context, allocator slack, framework buffers, per GPU
ACTIVATION_TOKENS = 4096  # largest prefill chunk we reserve activation memory for


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

    @property
    def fits(self) -> bool:
        return self.kv_capacity_tokens > 0

    def _time(self, tokens: float, flops: float, mem_bytes: float) -> float:
        comm = 0.0
        if self.tp > 1:  # two all-reduces per layer (after attention and after the MLP)
            comm = 2 * self.num_layers * allreduce_time_s(tokens * self.hidden_bytes_per_token, self.tp,
                                                          self.link_bytes_s)
        return (roofline_time_s(flops, mem_bytes, tokens, self.flops_s, self.mem_bytes_s,
                                self.compute_saturation_tokens) + comm + self.overhead_s)

    def prefill_time_s(self, total_tokens: float, sum_sq_tokens: float, num_seqs: float = 1.0) -> float:
        """One forward pass over a batch of `num_seqs` prompts: Σlen tokens and Σlen² for attention."""
        flops = (total_tokens * self.linear_flops_per_token + sum_sq_tokens * self.attn_prefill_flops_per_sq_token
                 + num_seqs * self.lm_head_flops_per_seq)
        mem = self.streamed_weight_bytes + total_tokens * self.kv_bytes_per_token
        return self._time(total_tokens, flops, mem)

    def decode_time_s(self, batch_size: float, total_context_tokens: float) -> float:
        """One decode step for `batch_size` sequences holding `total_context_tokens` of KV in all."""
        flops = (batch_size * (self.linear_flops_per_token + self.lm_head_flops_per_seq)
                 + total_context_tokens * self.attn_decode_flops_per_ctx_token)
        mem = self.streamed_weight_bytes + total_context_tokens * self.kv_bytes_per_token
        return self._time(batch_size, flops, mem)


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
    )


def group_perf(model: ModelSpec, stages: Sequence[tuple[Sequence[GpuRef], int]], cluster: Cluster) -> GroupPerf:
    """Build a group's cost from (gpus, num_layers) per stage, in pipeline order."""
    n = len(stages)
    perfs = tuple(stage_perf(model, g, layers, cluster, first=i == 0, last=i == n - 1)
                  for i, (g, layers) in enumerate(stages))
    sends = tuple(cluster.min_bandwidth_bytes_s(list(stages[i][0]), list(stages[i + 1][0])) for i in range(n - 1))
    return GroupPerf(perfs, sends)
