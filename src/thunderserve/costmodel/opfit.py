"""Fitting the step-time model's non-GEMM terms to measured kernels (pure: arrays in, factors out).

* Element-wise kernels (norms, rotary, activation, residual adds) of one layer at T tokens:
      t = fixed + T · bytes_per_token / (bandwidth · elementwise_memory_efficiency)
  (`costmodel.perf.elementwise_bytes_per_token`); fitted per GPU type on Vidur's `mlp.csv` columns.
* Prefill attention of one layer, a chunk of c tokens after `done` prefilled ones (FlashAttention):
      t = overhead + 4·hidden·(c·done + c²/2 + pad·c) / (peak · attention_prefill_efficiency)
  `pad` is the per-query work the kernel spends beyond the causal FLOPs (tiles along the diagonal, softmax
  rescaling, writing the chunk's KV), expressed as extra key positions so that it scales with FLOPs.
* Decode attention of one layer, `batch` sequences of `kv` context tokens each:
      t = overhead + batch · kv · kv_bytes_per_token_per_layer / (bandwidth · attention_decode_memory_efficiency)
Both attention terms are fractions of the datasheet peak FLOP/s and bandwidth, so a fit on one GPU carries to
another by its datasheet (the shipped profile is A100 only; see README "How the step-time model carries").
Fits are non-negative least squares on relative residuals (each point weighs by its own size), deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from thunderserve.costmodel.fit import ErrorStats, error_stats


@dataclass(frozen=True)
class ElementwiseFit:
    fixed_us: float  # per layer, at zero tokens
    memory_efficiency: float  # fraction of datasheet bandwidth
    errors: ErrorStats


@dataclass(frozen=True)
class AttentionFit:
    prefill_efficiency: float  # fraction of peak FLOP/s
    pad_tokens: float  # extra key positions per query token
    prefill_overhead_us: float  # per layer
    decode_memory_efficiency: float  # fraction of peak bandwidth
    decode_overhead_us: float  # per layer
    prefill_errors: ErrorStats
    decode_errors: ErrorStats


def _relative_nnls(features: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """Non-negative weights w minimising Σ(features·w / measured - 1)²."""
    w, _ = nnls(features / measured[:, None], np.ones_like(measured))
    return w


def fit_elementwise(tokens: np.ndarray, bytes_per_token: np.ndarray, bandwidth_bytes_s: np.ndarray,
                    measured_s: np.ndarray) -> ElementwiseFit:
    """Fixed part and bandwidth efficiency of the element-wise kernels of one layer."""
    if measured_s.size < 2:
        raise ValueError("need at least 2 measured element-wise points")
    ideal = tokens * bytes_per_token / bandwidth_bytes_s
    w = _relative_nnls(np.stack([np.full_like(ideal, 1e-6), ideal], axis=1), measured_s)
    eff = float(min(1.0, 1.0 / w[1])) if w[1] > 0 else 1.0
    pred = elementwise_time_s(tokens, bytes_per_token, bandwidth_bytes_s, float(w[0]), eff)
    return ElementwiseFit(float(w[0]), eff, error_stats(pred, measured_s))


def elementwise_time_s(tokens: np.ndarray, bytes_per_token: np.ndarray, bandwidth_bytes_s: np.ndarray,
                       fixed_us: float, efficiency: float) -> np.ndarray:
    return fixed_us * 1e-6 + tokens * bytes_per_token / (bandwidth_bytes_s * efficiency)


def prefill_attention_time_s(chunk: np.ndarray, done: np.ndarray, hidden: float, peak_flops_s: float,
                             efficiency: float, pad_tokens: float, overhead_us: float) -> np.ndarray:
    """Prefill attention of one layer (the formula of `StagePerf.step_time_s` for one chunk)."""
    flops = 4.0 * hidden * (chunk * done + chunk * chunk / 2.0 + pad_tokens * chunk)
    return overhead_us * 1e-6 + flops / (peak_flops_s * efficiency)


def decode_attention_time_s(batch: np.ndarray, kv: np.ndarray, kv_bytes_per_token: float,
                            bandwidth_bytes_s: float, efficiency: float, overhead_us: float) -> np.ndarray:
    """Decode attention of one layer (the formula of `StagePerf.step_time_s`)."""
    return overhead_us * 1e-6 + batch * kv * kv_bytes_per_token / (bandwidth_bytes_s * efficiency)


def fit_attention(prefill_chunk: np.ndarray, prefill_done: np.ndarray, prefill_s: np.ndarray,
                  decode_batch: np.ndarray, decode_kv: np.ndarray, decode_s: np.ndarray, *, hidden: float,
                  kv_bytes_per_token: float, peak_flops_s: float, bandwidth_bytes_s: float) -> AttentionFit:
    """Fit the five attention factors to measured per-layer kernel times of one GPU and model."""
    if prefill_s.size < 3 or decode_s.size < 2:
        raise ValueError("need at least 3 prefill and 2 decode attention points")
    c, d = prefill_chunk.astype(float), prefill_done.astype(float)
    unit = 4.0 * hidden / peak_flops_s  # seconds per (key position x query) at full peak
    wp = _relative_nnls(np.stack([np.full_like(c, 1e-6), unit * (c * d + c * c / 2.0), unit * c], axis=1), prefill_s)
    p_eff = float(min(1.0, 1.0 / wp[1])) if wp[1] > 0 else 1.0
    pad = float(wp[2] * p_eff)
    b, kv = decode_batch.astype(float), decode_kv.astype(float)
    ideal = b * kv * kv_bytes_per_token / bandwidth_bytes_s
    wd = _relative_nnls(np.stack([np.full_like(b, 1e-6), ideal], axis=1), decode_s)
    d_eff = float(min(1.0, 1.0 / wd[1])) if wd[1] > 0 else 1.0
    p_pred = prefill_attention_time_s(c, d, hidden, peak_flops_s, p_eff, pad, float(wp[0]))
    d_pred = decode_attention_time_s(b, kv, kv_bytes_per_token, bandwidth_bytes_s, d_eff, float(wd[0]))
    return AttentionFit(p_eff, pad, float(wp[0]), d_eff, float(wd[0]), error_stats(p_pred, prefill_s),
                        error_stats(d_pred, decode_s))
