"""KV quantisation: exact `none`, per-element error bounds for int8/int4, wire format, sizes, codecs."""

from __future__ import annotations

import math

import pytest
import torch

from thunderserve.runtime.engine.base import KVCache
from thunderserve.runtime.kv.quantize import (
    HEADER_BYTES,
    KvQuantCodec,
    QuantizedKV,
    dequantize_groups,
    dequantize_kv,
    from_bytes,
    hadamard,
    payload_nbytes,
    profile_codecs,
    quantize_kv,
    rotated_groups,
    to_bytes,
)
from thunderserve.runtime.workers.codec import QuantizeKvCodec


def make_kv(shape: tuple[int, int, int, int] = (2, 3, 5, 64), seed: int = 0, dtype: torch.dtype = torch.float32,
            first_layer: int = 0, scale: float = 1.0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(shape, generator=g) * scale).to(dtype)
    values = (torch.randn(shape, generator=g) * scale + 0.5).to(dtype)
    return KVCache(keys=keys, values=values, first_layer=first_layer)


def assert_within_bound(kv: KVCache, compression: str, group_size: int = 64, rotate: bool = True) -> QuantizedKV:
    """Every element's error is at most scale/2 of its group in the quantised coordinates; without rotation
    that holds for the cache itself, with rotation each group's L2 error is at most sqrt(g) * scale/2."""
    q = quantize_kv(kv, compression, group_size, rotate=rotate)
    back = from_bytes(to_bytes(q))
    out = dequantize_kv(back)
    g = q.group_size
    for which in ("keys", "values"):
        x, y, t = getattr(kv, which), getattr(out, which), getattr(back, which)
        assert y.shape == x.shape and y.dtype == x.dtype
        scale = t.scale.to(torch.float32)
        want = rotated_groups(x, g, q.rotated)
        err = (dequantize_groups(t, compression) - want).abs()
        tol = 1e-6 * (want.abs() + scale[..., None]) + 1e-30
        assert bool((err <= scale[..., None] / 2 + tol).all()), f"{which}: grid error {float(err.max())}"
        diff = y.to(torch.float32) - x.to(torch.float32)
        if not q.rotated:
            assert bool((diff.abs() <= scale.repeat_interleave(g, -1)[:, : x.shape[-1]].reshape(x.shape) / 2
                         + 1e-6 * (x.abs() + 1)).all()), which
        elif x.numel():
            d = x.shape[-1]
            rows = torch.nn.functional.pad(diff.reshape(-1, d), (0, -d % g)).reshape(scale.shape[0], -1, g)
            l2 = rows.pow(2).sum(-1).sqrt()
            assert bool((l2 <= math.sqrt(g) * scale / 2 + 1e-5 * (1 + x.abs().max())).all()), which
    return q


def test_none_round_trip_is_exact_for_every_dtype() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kv = make_kv(dtype=dtype, first_layer=7)
        out = dequantize_kv(from_bytes(to_bytes(quantize_kv(kv, "none"))))
        assert torch.equal(out.keys, kv.keys) and torch.equal(out.values, kv.values)
        assert out.keys.dtype == dtype and out.first_layer == 7


@pytest.mark.parametrize("compression", ["int8", "int4"])
@pytest.mark.parametrize("rotate", [True, False])
def test_error_within_half_a_step_per_group(compression: str, rotate: bool) -> None:
    for seed, shape in enumerate([(2, 3, 5, 64), (1, 2, 9, 128), (3, 1, 4, 96), (1, 1, 3, 7)]):
        q = assert_within_bound(make_kv(shape, seed=seed, scale=3.0), compression, rotate=rotate)
        assert q.rotated == rotate  # every group size here is a power of two (head_dim 7: one padded group of 8)



def test_int4_is_coarser_than_int8_and_both_are_close() -> None:
    kv = make_kv((4, 2, 16, 64))
    err = {c: float((dequantize_kv(quantize_kv(kv, c)).keys - kv.keys).abs().max()) for c in ("int8", "int4")}
    assert err["int8"] < 0.05 < err["int4"] < 0.6


def test_constant_groups_have_zero_scale_and_come_back_exactly() -> None:
    """Unrotated, any fp16-representable constant group comes back exactly (scale 0, zero point = value)."""
    keys = torch.full((1, 2, 3, 64), 1.5)
    values = torch.zeros((1, 2, 3, 64))
    kv = KVCache(keys=keys, values=values)
    for c in ("int8", "int4"):
        q = quantize_kv(kv, c, rotate=False)
        out = dequantize_kv(from_bytes(to_bytes(q)))
        assert torch.equal(out.keys, keys) and torch.equal(out.values, values)
        assert bool((q.keys.scale == 0).all()) and bool((q.values.scale == 0).all())
        rotated = assert_within_bound(kv, c)  # rotated: a constant is no longer constant, zeros still are
        assert bool((rotated.values.scale == 0).all()) and torch.equal(dequantize_kv(rotated).values, values)


def test_hadamard_is_orthonormal_and_symmetric() -> None:
    for n in (1, 2, 8, 64):
        h = hadamard(n)
        assert torch.allclose(h @ h, torch.eye(n), atol=1e-6) and torch.equal(h, h.T)
    with pytest.raises(ValueError):
        hadamard(12)


def test_fp16_cache_round_trips_through_its_own_dtype() -> None:
    kv = make_kv((2, 2, 8, 64), dtype=torch.float16)
    for c in ("int8", "int4"):
        out = dequantize_kv(from_bytes(to_bytes(quantize_kv(kv, c))))
        assert out.keys.dtype == torch.float16
        assert float((out.keys.float() - kv.keys.float()).abs().max()) < 0.5


def test_huge_values_fall_back_to_float32_parameters() -> None:
    kv = make_kv((1, 1, 4, 64), scale=1e6)
    for c in ("int8", "int4"):
        q = assert_within_bound(kv, c)
        assert q.param_dtype == torch.float32


def test_payload_sizes_and_ratios_vs_fp16() -> None:
    kv = make_kv((4, 2, 32, 64), dtype=torch.float16)
    fp16 = 2 * kv.keys.numel() * 2
    sizes = {c: len(to_bytes(quantize_kv(kv, c))) for c in ("none", "int8", "int4")}
    for c, n in sizes.items():
        assert n == payload_nbytes(quantize_kv(kv, c))
    assert sizes["none"] == fp16 + HEADER_BYTES
    assert fp16 / sizes["int8"] >= 1.75
    assert fp16 / sizes["int4"] >= 3.5


def test_header_is_validated() -> None:
    blob = to_bytes(quantize_kv(make_kv(), "int4"))
    with pytest.raises(ValueError, match="magic"):
        from_bytes(b"XXXX" + blob[4:])
    with pytest.raises(ValueError, match="version"):
        from_bytes(blob[:4] + bytes([99]) + blob[5:])
    with pytest.raises(ValueError, match="bytes"):
        from_bytes(blob[:-1])
    with pytest.raises(ValueError, match="header"):
        from_bytes(blob[:10])
    with pytest.raises(ValueError, match="compression"):
        quantize_kv(make_kv(), "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_kv(make_kv(), "int4", group_size=3)


def test_payload_describes_itself() -> None:
    kv = make_kv((3, 2, 6, 32), dtype=torch.bfloat16, first_layer=4)
    q = from_bytes(to_bytes(quantize_kv(kv, "int4", group_size=16)))
    assert (q.compression, q.shape, q.dtype, q.first_layer, q.group_size) == ("int4", (3, 2, 6, 32),
                                                                                torch.bfloat16, 4, 16)
    assert q.keys.data.dtype == torch.uint8 and q.keys.data.shape == (36, 2, 8)
    assert q.keys.scale is not None and q.keys.scale.dtype == torch.float16
    assert quantize_kv(kv, "int8").keys.data.dtype == torch.uint8 and q.rotated
    assert quantize_kv(kv, "int8").param_dtype == torch.float32
    assert not quantize_kv(kv, "int4", group_size=16, rotate=False).rotated
    assert not from_bytes(to_bytes(quantize_kv(make_kv((1, 1, 2, 12)), "int4"))).rotated  # group of 12


def test_empty_and_non_contiguous_caches() -> None:
    empty = KVCache(keys=torch.zeros(2, 2, 0, 64), values=torch.zeros(2, 2, 0, 64))
    for c in ("none", "int8", "int4"):
        out = dequantize_kv(from_bytes(to_bytes(quantize_kv(empty, c))))
        assert out.keys.shape == (2, 2, 0, 64)
    big = make_kv((2, 2, 10, 64))
    view = KVCache(keys=big.keys[:, :, :4], values=big.values[:, :, :4])
    out = dequantize_kv(from_bytes(to_bytes(quantize_kv(view, "none"))))
    assert torch.equal(out.keys, big.keys[:, :, :4])


def test_codecs_match_the_workers_codec() -> None:
    kv = make_kv()
    codecs = profile_codecs()
    assert sorted(codecs) == ["int4", "int8", "none"]
    for name, codec in codecs.items():
        assert isinstance(codec, KvQuantCodec)
        blob = codec.encode(kv)
        assert blob == QuantizeKvCodec(name).encode(kv)
        assert torch.equal(codec.decode(blob).keys, QuantizeKvCodec(name).decode(blob).keys)
