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
                         compression: Compression | str = Compression.NONE, *,
                         decode_stages: Sequence[tuple[Sequence[GpuRef], int]] | None = None) -> float:
    """Marginal transfer seconds per prompt token from a prefill group to a decode group.

    Stages are (GPUs, number of layers), in layer order from layer 0. Each prefill stage sends the KV of its
    own layers in parallel with the other stages; the slowest stage sets the pace. Without `decode_stages`
    a stage sends everything over the slowest link to any of the decode group's GPUs. With them, each layer's
    KV goes only to the decode stage holding that layer (per-segment transfer: a pipeline whose prefill and
    decode segments of the same layers share a node keeps its KV inside the node), a stage's sends to
    several decode stages following each other. Returns inf when a needed link has zero bandwidth.
    """
    ratio = compression_ratio(compression, model.dtype_bytes)
    per_layer = model.kv_bytes_per_token_per_layer * ratio
    targets = [(list(decode_gpus), 0, model.num_layers)] if decode_stages is None else _ranges(decode_stages)
    worst = 0.0
    for gpus, lo, hi in _ranges(prefill_stages):
        seconds = 0.0
        for dst, d_lo, d_hi in targets:
            overlap = min(hi, d_hi) - max(lo, d_lo)
            if decode_stages is None:
                overlap = hi - lo
            if overlap <= 0:
                continue
            bw = cluster.min_bandwidth_bytes_s(list(gpus), dst)
            if bw <= 0:
                return float("inf")
            seconds += per_layer * overlap / bw
        worst = max(worst, seconds)
    return worst


def _ranges(stages: Sequence[tuple[Sequence[GpuRef], int]]) -> list[tuple[list[GpuRef], int, int]]:
    """(GPUs, first layer, end layer) of consecutive stages starting at layer 0."""
    out, start = [], 0
    for gpus, layers in stages:
        out.append((list(gpus), start, start + layers))
        start += layers
    return out


def kv_transfer_time_s(num_tokens: float, seconds_per_token: float) -> float:
    """Time to move one request's KV given the per-token rate from `kv_seconds_per_token`."""
    if seconds_per_token == float("inf"):
        return float("inf")
    return send_time_s(num_tokens, 1.0 / seconds_per_token) if seconds_per_token > 0 else 0.0
