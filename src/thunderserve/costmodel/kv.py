"""KV-cache size and transfer time between a prefill group and a decode group."""

from __future__ import annotations

from collections.abc import Sequence

from thunderserve.costmodel.comm import Compression, compression_ratio, send_time_s
from thunderserve.costmodel.network import Topology, alone_seconds_per_token, kv_paths
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
    own layers in parallel with the other stages (`costmodel.network.kv_paths`). Without `decode_stages` a
    stage sends everything over the slowest link to any of the decode group's GPUs. With them, each layer's
    KV goes only to the decode stage holding that layer (per-segment transfer: a pipeline whose prefill and
    decode segments of the same layers share a node keeps its KV inside the node). Streams that cross a
    common resource (the NIC of a node holding several stages) share it, as they would alone on the network
    (`costmodel.network.alone_seconds_per_token`). Returns inf when a needed link has zero bandwidth.
    """
    topology = Topology.of(cluster)
    paths = kv_paths(model, prefill_stages, decode_gpus, cluster, topology, compression,
                     decode_stages=decode_stages)
    return alone_seconds_per_token(paths, topology.capacity_bytes_s)


def codec_seconds_per_token(model: ModelSpec, stages: Sequence[tuple[Sequence[GpuRef], int]],
                            compression: Compression | str) -> float:
    """GPU seconds per prompt token a group spends quantising (prefill side) or dequantising (decode side) its
    KV at this compression: each stage codes its own layers' fp16 KV, split over its TP GPUs, at the slowest
    GPU's `GpuSpec.codec_bytes_s` (measured on the CPU by `bench-kv`; on GPUs a memory-bandwidth-bound
    estimate); stages work in parallel, the slowest sets the time. 0 without compression."""
    if Compression(compression) is Compression.NONE:
        return 0.0
    per_layer = float(model.kv_bytes_per_token_per_layer)
    return max((per_layer * layers / (len(gpus) * min(g.spec.codec_bytes_s for g in gpus))
                for gpus, layers in stages if gpus and layers > 0), default=0.0)


def kv_transfer_time_s(num_tokens: float, seconds_per_token: float) -> float:
    """Time to move one request's KV given the per-token rate from `kv_seconds_per_token`."""
    if seconds_per_token == float("inf"):
        return float("inf")
    return send_time_s(num_tokens, 1.0 / seconds_per_token) if seconds_per_token > 0 else 0.0
