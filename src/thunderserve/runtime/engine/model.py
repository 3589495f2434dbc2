"""The Llama forward pass in plain PyTorch, over a packed batch of sequences (no padding between sequences).

Every token of every sequence in the batch is one row of `x` [rows, hidden]. Linear layers run once over all
rows; attention runs per sequence against that sequence's own KV storage, which the new keys/values are
written into first. So prefill (many new tokens, empty cache), decode (one new token, long cache) and
chunked prefill mix freely in one call, and a sequence's numbers do not depend on who else is in the batch.

Tensor parallelism: a shard holds a slice of the query/kv heads and of the MLP columns; the caller passes
`all_reduce`, applied after o_proj and down_proj (biases of those two are added once, after the reduce).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from thunderserve.runtime.engine.base import KVBuffer

AllReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LayerWeights:
    """One decoder layer's tensors (this rank's shard; q/k/v fused, gate/up fused)."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads * head_dim]
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None


@dataclass
class StageWeights:
    """What one pipeline stage holds: its layers, plus the embedding (first stage) and norm + head (last)."""

    layers: list[LayerWeights]
    embed: torch.Tensor | None  # [vocab, hidden]; first stage only
    norm: torch.Tensor | None  # [hidden]; last stage only
    lm_head: torch.Tensor | None  # [vocab, hidden]; last stage only (may be the embedding itself when tied)


@dataclass(frozen=True)
class ShardShape:
    """Per-rank attention/MLP sizes of a stage."""

    num_heads: int  # query heads on this rank
    num_kv_heads: int  # kv heads on this rank
    head_dim: int
    intermediate: int  # MLP columns on this rank
    rms_norm_eps: float


@dataclass
class SeqSlot:
    """Where one sequence's rows sit in the packed batch and where its KV goes."""

    row_start: int  # first row of this sequence in x
    num_new: int  # rows (new tokens) of this sequence
    past_tokens: int  # tokens already in the KV storage (the new ones land after them)
    buffer: KVBuffer  # storage with capacity >= past_tokens + num_new


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back (as transformers' LlamaRMSNorm)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, head_dim]; cos/sin [rows, head_dim]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def _attend(q: torch.Tensor, slot: SeqSlot, layer: int, gqa: bool) -> torch.Tensor:
    """Attention of one sequence's new queries [heads, n, d] over its cached + new keys; returns [n, heads, d]."""
    total = slot.past_tokens + slot.num_new
    k = slot.buffer.keys[layer, :, :total].unsqueeze(0)
    v = slot.buffer.values[layer, :, :total].unsqueeze(0)
    mask: torch.Tensor | None = None
    causal = False
    if slot.num_new > 1:
        if slot.past_tokens == 0:
            causal = True
        else:
            pos = torch.arange(slot.num_new, device=q.device) + slot.past_tokens
            mask = torch.arange(total, device=q.device)[None, :] <= pos[:, None]
    out = F.scaled_dot_product_attention(q.unsqueeze(0), k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def layer_forward(w: LayerWeights, shape: ShardShape, layer: int, x: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor, slots: Sequence[SeqSlot], all_reduce: AllReduce | None) -> torch.Tensor:
    """One decoder layer over the packed rows; writes each sequence's new K/V into its buffer at `layer`."""
    rows = x.shape[0]
    hq, hkv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    h = rms_norm(x, w.input_norm, shape.rms_norm_eps)
    qkv = F.linear(h, w.qkv, w.qkv_bias)
    q = qkv[:, : hq * d].view(rows, hq, d)
    k = qkv[:, hq * d: (hq + hkv) * d].view(rows, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(rows, hkv, d)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = torch.zeros(rows, hq, d, dtype=x.dtype, device=x.device)
    gqa = hq != hkv
    for s in slots:
        lo, hi = s.row_start, s.row_start + s.num_new
        s.buffer.keys[layer, :, s.past_tokens: s.past_tokens + s.num_new] = k[lo:hi].transpose(0, 1)
        s.buffer.values[layer, :, s.past_tokens: s.past_tokens + s.num_new] = v[lo:hi].transpose(0, 1)
        attn[lo:hi] = _attend(q[lo:hi].transpose(0, 1), s, layer, gqa)
    o = F.linear(attn.view(rows, hq * d), w.o)
    if all_reduce is not None:
        o = all_reduce(o)
    if w.o_bias is not None:
        o = o + w.o_bias
    x = x + o
    h = rms_norm(x, w.post_norm, shape.rms_norm_eps)
    gu = F.linear(h, w.gate_up, w.gate_up_bias)
    m = F.linear(F.silu(gu[:, : shape.intermediate]) * gu[:, shape.intermediate:], w.down)
    if all_reduce is not None:
        m = all_reduce(m)
    if w.down_bias is not None:
        m = m + w.down_bias
    return x + m


def pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Append zero rows so the row count is a multiple of `multiple` (batch-size-independent GEMM kernels)."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros((extra, *x.shape[1:]))])


def final_logits(weights: StageWeights, x_last: torch.Tensor, eps: float, row_multiple: int) -> torch.Tensor:
    """Final norm + lm_head for the given rows [n, hidden] -> float32 logits [n, vocab]."""
    assert weights.norm is not None and weights.lm_head is not None
    n = x_last.shape[0]
    h = rms_norm(pad_rows(x_last, row_multiple), weights.norm, eps)
    return F.linear(h, weights.lm_head)[:n].to(torch.float32)
