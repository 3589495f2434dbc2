"""KV-cache size and transfer time between a prefill group and a decode group."""

from __future__ import annotations

from collections.abc import Sequence

from thunderserve.costmodel.comm import Compression, compression_ratio, send_time_s
from thunderserve.spec.cluster import Cluster, GpuRef
from thunderserve.spec.model import ModelSpec


def kv_bytes(model: ModelSpec, num_tokens: float, compression: Compression | str = Compression.NONE) -> float:
    """Bytes of KV cache for `num_tokens` tokens over all layers (GQA aware), after compression."""
    return num_tokens * model.kv_bytes_per_token * compression_ratio(compression, model.dtype_bytes)


def kv_seconds_per_token(model: ModelSpec, prefill_stages: Sequence[tuple[Sequence[GpuRef], int]],
                         decode_gpus: Sequence[GpuRef], cluster: Cluster,
                         compression: Compression | str = Compression.NONE) -> float:
    """Marginal transfer seconds per prompt token from a prefill group to a decode group.

    Each prefill stage sends the KV of its own layers in parallel with the others, over the slowest link
    between its GPUs and the decode group's GPUs; the slowest stage sets the pace. Returns inf when a
    needed link has zero bandwidth.
    """
    ratio = compression_ratio(compression, model.dtype_bytes)
    worst = 0.0
    for gpus, layers in prefill_stages:
        bw = cluster.min_bandwidth_bytes_s(list(gpus), list(decode_gpus))
        if bw <= 0:
            return float("inf")
        worst = max(worst, model.kv_bytes_per_token_per_layer * layers * ratio / bw)
    return worst


def kv_transfer_time_s(num_tokens: float, seconds_per_token: float) -> float:
    """Time to move one request's KV given the per-token rate from `kv_seconds_per_token`."""
    if seconds_per_token == float("inf"):
        return float("inf")
    return send_time_s(num_tokens, 1.0 / seconds_per_token) if seconds_per_token > 0 else 0.0
