"""Communication costs: TP all-reduce, PP activation send, KV-cache transfer (with compression)."""

from __future__ import annotations

from enum import StrEnum

ALLREDUCE_LATENCY_S = 15e-6  # per ring step start-up (launch + link latency)
SEND_LATENCY_S = 30e-6  # per point-to-point activation/KV message
KV_GROUP_SIZE = 64  # elements sharing one scale (and zero point) in compressed KV
KV_SINK_TOKENS = 1  # leading tokens (the attention sink) sent in 16 bits by compressed KV
KV_KEY_BLOCK_TOKENS = 128  # tokens sharing one key scale (and zero point) per channel in compressed KV
KV_RATIO_TOKENS = 512  # the prompt length the per-token compression ratio is quoted at
KV_RESIDUAL_TOKENS = 128  # int4 only: the prompt's most recent tokens sent in 16 bits (runtime.kv.schemes)
KV_INT4_KEY_BLOCK_TOKENS = 64  # int4 only: tokens sharing one key scale per channel (finer than int8's 128)


class Compression(StrEnum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"


def compression_ratio(compression: Compression | str, dtype_bytes: int = 2, group_size: int = KV_GROUP_SIZE,
                      num_tokens: int = KV_RATIO_TOKENS) -> float:
    """Compressed KV bytes over uncompressed bytes, for one prompt of `num_tokens` tokens (the format of
    `runtime.kv.quantize`, head_dim a multiple of `group_size`; the payload's 44-byte header is left out).

    Per channel of one layer and head: the first KV_SINK_TOKENS tokens' keys and values in 16 bits; the other
    tokens' keys at one byte (int8) or half a byte (int4) each (int4 also sends the last KV_RESIDUAL_TOKENS
    tokens in 16 bits) plus a scale and a zero point per block of
    KV_KEY_BLOCK_TOKENS tokens (KV_INT4_KEY_BLOCK_TOKENS for int4); their values likewise plus a scale and a zero point per token and group of
    `group_size` channels. Scales and zero points are float32 for int8, fp16 for int4.
    """
    c = Compression(compression)
    if c is Compression.NONE:
        return 1.0
    tokens = max(num_tokens, 1)
    code_bytes, param_bytes = (1.0, 4) if c is Compression.INT8 else (0.5, 2)
    sinks = min(KV_SINK_TOKENS + (KV_RESIDUAL_TOKENS if c is Compression.INT4 else 0), tokens)
    body = tokens - sinks
    key_blocks = -(-body // (KV_INT4_KEY_BLOCK_TOKENS if c is Compression.INT4 else KV_KEY_BLOCK_TOKENS))
    compressed = (2 * sinks * 2  # keys and values of the sink tokens, 16-bit
                  + 2 * body * code_bytes  # key and value codes
                  + key_blocks * 2 * param_bytes  # key scale + zero per channel and token block
                  + body * 2 * param_bytes / group_size)  # value scale + zero per token and group
    return compressed / (2 * tokens * dtype_bytes)


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
