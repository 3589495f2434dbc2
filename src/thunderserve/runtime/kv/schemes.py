"""The KV codec registry: named quantisation schemes, and which one each compression level runs.

A `KvScheme` is every knob of `runtime.kv.quantize` (bit width, value group size, key block, 16-bit sink and
recent-token windows, Hadamard rotation); every one is written into the payload header, so a decoder reads any
scheme without knowing its name. `LEVEL_SCHEMES` maps the planner's compression levels (`none`, `int8`,
`int4`; `costmodel.comm.Compression`) to the scheme the runtime sends; `SCHEMES` also lists the candidates the
trade-off benchmark measures (`benchmarks/bench_kv_schemes.py`), one point per scheme.

How `int4` was chosen (README, "KV compression"): among the 4-bit schemes that pass the quality gate
(`thunderserve.quality.gate`) on SmolLM2-135M at 2,048-token prompts, the one with the fewest bytes. The
recent-token window is KIVI's residual: the last `residual_tokens` tokens of the prompt, which the first decode
steps attend to most, travel in 16 bits. No torch here: the cost model and the gate read these facts cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from thunderserve.costmodel.comm import (
    KV_GROUP_SIZE,
    KV_INT4_KEY_BLOCK_TOKENS,
    KV_KEY_BLOCK_TOKENS,
    KV_RESIDUAL_TOKENS,
    KV_SINK_TOKENS,
)


@dataclass(frozen=True)
class KvScheme:
    """One quantisation scheme (the knobs of `quantize.quantize_kv`)."""

    name: str
    bits: int  # 8 or 4: code width of keys and values outside the 16-bit windows
    group_size: int = KV_GROUP_SIZE  # value elements per (token, group) scale
    key_block_tokens: int = KV_KEY_BLOCK_TOKENS  # tokens per (channel, block) key scale
    sink_tokens: int = KV_SINK_TOKENS  # leading tokens sent in 16 bits (the attention sink)
    residual_tokens: int = 0  # most recent tokens sent in 16 bits (KIVI's residual window)
    rotate_values: bool = True  # Hadamard-rotate value groups before quantising
    rotate_keys: bool = False  # Hadamard-rotate key rows along head_dim before the per-channel grid

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"scheme {self.name}: bits must be 4 or 8, got {self.bits}")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"scheme {self.name}: group_size must be an even number >= 2, got {self.group_size}")
        if self.key_block_tokens < 1 or self.sink_tokens < 0 or self.residual_tokens < 0:
            raise ValueError(f"scheme {self.name}: key_block_tokens must be >= 1 and the 16-bit windows >= 0")

    @property
    def compression(self) -> str:
        """The payload's compression code: "int8" or "int4"."""
        return f"int{self.bits}"

    def bytes_vs_fp16(self, num_tokens: int, head_dim: int = 128) -> float:
        """Payload bytes over fp16 bytes for one prompt of `num_tokens` tokens (header left out; head_dim a
        multiple of the group size). The count `costmodel.comm.compression_ratio` makes for the levels."""
        tokens = max(num_tokens, 1)
        windows = min(self.sink_tokens + self.residual_tokens, tokens)
        body = tokens - windows
        param_bytes = 4 if self.bits == 8 else 2
        groups = math.ceil(head_dim / self.group_size)
        per_channel = (2 * windows * 2  # keys and values of the 16-bit tokens
                       + 2 * body * self.bits / 8  # key and value codes
                       + math.ceil(body / self.key_block_tokens) * 2 * param_bytes  # key scale + zero per block
                       + body * groups * 2 * param_bytes / head_dim)  # value scale + zero per token and group
        return per_channel / (2 * tokens * 2)


INT8 = KvScheme("int8", bits=8)
# The 4-bit scheme the runtime sends as `int4` (see the module docstring): a 128-token 16-bit recent window,
# Hadamard-rotated keys quantised per channel in blocks of 64 tokens. On SmolLM2-135M (2026-12-03, bench-kv's
# 10 documents): perplexity +0.22%, teacher-forced agreement 0.9929, 3.06x fewer bytes than fp16 at 2,048 tokens;
# the former int4 (keys unrotated, blocks of 128; now `int4-r128`) had 0.9850 and failed the gate.
INT4 = KvScheme("int4", bits=4, residual_tokens=KV_RESIDUAL_TOKENS, key_block_tokens=KV_INT4_KEY_BLOCK_TOKENS,
                rotate_keys=True)

# Candidates measured by the trade-off benchmark (one point each). Names say what differs from the default
# layout (keys per channel in blocks of 128 tokens, values per token in rotated groups of 64, one sink token):
# r<N>: N recent tokens in 16 bits; g<N>: value groups of N; kb<N>: key blocks of N tokens; rk: rotated keys.
# `int4` itself is r128-rk-kb64.
SCHEMES: dict[str, KvScheme] = {s.name: s for s in (
    INT8,
    KvScheme("int4-r0", bits=4),
    KvScheme("int4-r32", bits=4, residual_tokens=32),
    KvScheme("int4-r64", bits=4, residual_tokens=64),
    KvScheme("int4-r128", bits=4, residual_tokens=128),
    KvScheme("int4-r256", bits=4, residual_tokens=256),
    KvScheme("int4-r128-g32", bits=4, residual_tokens=128, group_size=32),
    KvScheme("int4-r128-kb64", bits=4, residual_tokens=128, key_block_tokens=64),
    KvScheme("int4-r128-rk", bits=4, residual_tokens=128, rotate_keys=True),
    KvScheme("int4-r160-rk", bits=4, residual_tokens=160, rotate_keys=True),
    KvScheme("int4-r160-rk-kb256", bits=4, residual_tokens=160, rotate_keys=True, key_block_tokens=256),
    INT4,
)}

LEVEL_SCHEMES: dict[str, KvScheme] = {"int8": INT8, "int4": INT4}
