"""Communication costs: TP all-reduce, PP activation send, KV-cache transfer (with compression)."""

from __future__ import annotations

from enum import StrEnum

ALLREDUCE_LATENCY_S = 15e-6  # per ring step start-up (launch + link latency)
SEND_LATENCY_S = 30e-6  # per point-to-point activation/KV message
KV_GROUP_SIZE = 64  # elements sharing one scale (and zero point) in compressed KV


class Compression(StrEnum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"


def compression_ratio(compression: Compression | str, dtype_bytes: int = 2, group_size: int = KV_GROUP_SIZE
                      ) -> float:
    """Compressed KV bytes over uncompressed bytes.

    int8: one byte per value plus an fp16 scale per group; int4: half a byte per value plus an fp16 scale
    and an fp16 zero point per group.
    """
    c = Compression(compression)
    raw = dtype_bytes * group_size
    if c is Compression.NONE:
        return 1.0
    if c is Compression.INT8:
        return (group_size + 2) / raw
    return (group_size / 2 + 4) / raw


def allreduce_time_s(num_bytes: float, tp: int, link_bytes_s: float) -> float:
    """Ring all-reduce of `num_bytes` over `tp` ranks whose slowest link is `link_bytes_s`."""
    if tp <= 1:
        return 0.0
    if link_bytes_s <= 0:
        return float("inf")
    steps = 2 * (tp - 1)
    return steps * ALLREDUCE_LATENCY_S + steps / tp * num_bytes / link_bytes_s


def send_time_s(num_bytes: float, link_bytes_s: float) -> float:
    """One point-to-point message (PP activations, a KV cache) over a link."""
    if num_bytes <= 0:
        return 0.0
    if link_bytes_s <= 0:
        return float("inf")
    return SEND_LATENCY_S + num_bytes / link_bytes_s
