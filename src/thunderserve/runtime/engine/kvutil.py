"""A `KVCache` as a plain dict of tensors (for safetensors, torch.save or a custom transport) and back."""

from __future__ import annotations

import torch

from thunderserve.runtime.engine.base import KVCache


def kv_to_tensors(kv: KVCache) -> dict[str, torch.Tensor]:
    """{"keys", "values", "first_layer"}: contiguous copies (the cache's spare storage is not included)."""
    return {"keys": kv.keys.contiguous().clone(), "values": kv.values.contiguous().clone(),
            "first_layer": torch.tensor(kv.first_layer, dtype=torch.int64)}


def kv_from_tensors(tensors: dict[str, torch.Tensor]) -> KVCache:
    """Inverse of `kv_to_tensors`."""
    keys, values = tensors["keys"], tensors["values"]
    if keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"keys/values must share one [layers, kv_heads, tokens, head_dim] shape, got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    first = int(tensors["first_layer"]) if "first_layer" in tensors else 0
    return KVCache(keys=keys, values=values, first_layer=first)
