"""The KV codec seam: KVCache <-> bytes for transfer (quantised per the plan, or raw in tests)."""

from __future__ import annotations

from typing import Protocol

from thunderserve.costmodel.comm import Compression
from thunderserve.runtime.engine.base import KVCache


class KvCodec(Protocol):
    def encode(self, kv: KVCache) -> bytes: ...

    def decode(self, data: bytes) -> KVCache: ...


class QuantizeKvCodec:
    """The production codec: `runtime.kv.quantize` at the plan's compression (none / int8 / int4)."""

    def __init__(self, compression: Compression | str, device: str = "cpu") -> None:
        self.compression = Compression(compression)
        self.device = device  # where imported caches go (the decode engine's device)

    def encode(self, kv: KVCache) -> bytes:
        from thunderserve.runtime.kv import quantize

        return quantize.to_bytes(quantize.quantize_kv(kv, self.compression))

    def decode(self, data: bytes) -> KVCache:
        from thunderserve.runtime.kv import quantize

        return quantize.dequantize_kv(quantize.from_bytes(data), device=self.device)
