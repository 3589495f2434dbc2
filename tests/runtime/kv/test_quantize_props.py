"""Property tests: the int8/int4 error bound and the wire format hold for arbitrary shapes, values and options."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quantize import assert_within_bound

from thunderserve.runtime.engine.base import KVCache
from thunderserve.runtime.kv.quantize import dequantize_kv, from_bytes, payload_nbytes, quantize_kv, to_bytes

shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(0, 6), st.integers(1, 70))


@st.composite
def caches(draw: st.DrawFn) -> KVCache:
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-4, 1.0, 37.0, 3e3]))
    offset = draw(st.sampled_from([0.0, -2.0, 100.0]))
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(shape, generator=g) * scale + offset
    values = torch.randn(shape, generator=g) * scale
    if draw(st.booleans()) and shape[2] > 0:  # constant groups: one token's whole head is one value
        keys[:, :, 0, :] = draw(st.sampled_from([0.0, 1.0, -3.25, 0.1]))
    return KVCache(keys=keys, values=values, first_layer=draw(st.integers(0, 40)))


@settings(max_examples=60, deadline=None)
@given(kv=caches(), compression=st.sampled_from(["int8", "int4"]), group_size=st.sampled_from([2, 8, 32, 64]),
       sink_tokens=st.sampled_from([0, 1, 2]), key_block_tokens=st.sampled_from([1, 3, 128]),
       residual_tokens=st.sampled_from([0, 1, 4]), rotate_keys=st.booleans(), rotate_values=st.booleans())
def test_error_bound_holds(kv: KVCache, compression: str, group_size: int, sink_tokens: int, key_block_tokens: int,
                           residual_tokens: int, rotate_keys: bool, rotate_values: bool) -> None:
    assert_within_bound(kv, compression, group_size, sink_tokens=sink_tokens, key_block_tokens=key_block_tokens,
                        residual_tokens=residual_tokens, rotate_keys=rotate_keys, rotate_values=rotate_values)


@settings(max_examples=40, deadline=None)
@given(kv=caches(), compression=st.sampled_from(["none", "int8", "int4"]))
def test_wire_format_round_trip(kv: KVCache, compression: str) -> None:
    q = quantize_kv(kv, compression)
    blob = to_bytes(q)
    assert len(blob) == payload_nbytes(q)
    back = from_bytes(blob)
    assert (back.compression, back.shape, back.dtype, back.first_layer) == (q.compression, q.shape, q.dtype,
                                                                            q.first_layer)
    assert to_bytes(back) == blob
    a, b = dequantize_kv(q), dequantize_kv(back)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    if compression == "none":
        assert torch.equal(b.keys, kv.keys) and torch.equal(b.values, kv.values)
