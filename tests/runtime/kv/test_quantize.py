"""KV quantisation: exact `none`, per-element error bounds for int8/int4, sinks, wire format, sizes, codecs."""

from __future__ import annotations

import pytest
import torch

from thunderserve.costmodel.comm import compression_ratio
from thunderserve.runtime.engine.base import KVCache
from thunderserve.runtime.kv.quantize import (
    HEADER_BYTES,
    VERSION,
    KvQuantCodec,
    QuantizedKV,
    dequantize_kv,
    from_bytes,
    grid_view,
    hadamard,
    payload_nbytes,
    profile_codecs,
    quantize_kv,
    to_bytes,
)
from thunderserve.runtime.kv.schemes import SCHEMES
from thunderserve.runtime.workers.codec import QuantizeKvCodec

LEVELS = {"int8": 255, "int4": 15}


def make_kv(shape: tuple[int, int, int, int] = (2, 3, 5, 64), seed: int = 0, dtype: torch.dtype = torch.float32,
            first_layer: int = 0, scale: float = 1.0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    keys = (torch.randn(shape, generator=g) * scale).to(dtype)
    values = (torch.randn(shape, generator=g) * scale + 0.5).to(dtype)
    return KVCache(keys=keys, values=values, first_layer=first_layer)


def assert_within_bound(kv: KVCache, compression: str, group_size: int = 64, **options: object) -> QuantizedKV:
    """Sink and recent tokens are off by at most 16-bit rounding. Every other element is off by at most half its
    group's step in the quantised coordinates; unrotated that bounds the cache itself, rotated each token's error
    over a group of g channels has L2 norm at most sqrt(sum (step/2)^2) over that group. Without an explicit
    `residual_tokens` the recent window is off (0), so small caches still exercise the grid."""
    options.setdefault("residual_tokens", 0)
    q = quantize_kv(kv, compression, group_size, **options)  # type: ignore[arg-type]
    back = from_bytes(to_bytes(q))
    out = dequantize_kv(back)
    g, s, d = q.group_size, q.sink_tokens, kv.keys.shape[-1]
    e = s + q.body_tokens
    for which, rotated in (("keys", q.rotate_keys), ("values", q.rotate_values)):
        x, y = getattr(kv, which).to(torch.float32), getattr(out, which)
        assert y.shape == x.shape and y.dtype == getattr(kv, which).dtype
        for a, b in ((0, s), (e, x.shape[2])):
            window_err = (y[:, :, a:b].to(torch.float32) - x[:, :, a:b]).abs()
            assert bool((window_err <= x[:, :, a:b].abs() * 2.0**-8 + 2.0**-24).all()), f"{which}: window"
        want, grid, step = grid_view(back, getattr(kv, which), which)
        tol = 1e-6 * (want.abs() + LEVELS[compression] * step) + 1e-30
        err = (grid - want).abs()
        assert bool((err <= step / 2 + tol).all()), f"{which}: grid error {float(err.max())}"
        diff = y[:, :, s:e].to(torch.float32) - x[:, :, s:e]
        noise = 1e-5 * (1 + float(x.abs().max())) if x.numel() else 0.0
        if not rotated:
            half = step[..., :d] / 2
            assert bool((diff.abs() <= half + noise + 2.0**-8 * x[:, :, s:e].abs()).all()), which
        elif diff.numel():
            padded = torch.nn.functional.pad(diff, (0, step.shape[-1] - d))
            l2 = padded.reshape(*padded.shape[:-1], -1, g).pow(2).sum(-1).sqrt()
            bound = (step / 2).pow(2).reshape(l2.shape + (g,)).sum(-1).sqrt()
            assert bool((l2 <= bound + noise).all()), which
    return q


def test_none_round_trip_is_exact_for_every_dtype() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        kv = make_kv(dtype=dtype, first_layer=7)
        out = dequantize_kv(from_bytes(to_bytes(quantize_kv(kv, "none"))))
        assert torch.equal(out.keys, kv.keys) and torch.equal(out.values, kv.values)
        assert out.keys.dtype == dtype and out.first_layer == 7


@pytest.mark.parametrize("compression", ["int8", "int4"])
@pytest.mark.parametrize(("rotate_values", "rotate_keys"), [(True, False), (False, False), (True, True)])
def test_error_within_half_a_step_per_group(compression: str, rotate_values: bool, rotate_keys: bool) -> None:
    shapes = [(2, 3, 5, 64), (1, 2, 9, 128), (3, 1, 4, 96), (1, 1, 3, 7), (1, 2, 300, 64)]
    for seed, shape in enumerate(shapes):
        q = assert_within_bound(make_kv(shape, seed=seed, scale=3.0), compression, rotate_values=rotate_values,
                                rotate_keys=rotate_keys)
        # every group size here is a power of two (head_dim 7: one padded group of 8)
        assert (q.rotate_values, q.rotate_keys) == (rotate_values, rotate_keys)
    q = assert_within_bound(make_kv((1, 2, 300, 64), scale=3.0), compression, sink_tokens=4, key_block_tokens=32)
    assert q.sink_tokens == 4 and q.keys.scale is not None and q.keys.scale.shape == (2, 64, 10)


def test_keys_are_grouped_per_channel_and_values_per_token() -> None:
    """A key channel with a huge range costs only that channel its precision; a value token likewise (keys
    unrotated: rotation, which int4 applies by default, spreads an outlier channel over the others)."""
    kv = make_kv((1, 1, 40, 64))
    keys, values = kv.keys.clone(), kv.values.clone()
    keys[:, :, 1:, 5] *= 1000.0
    values[:, :, 7, :] *= 1000.0
    out = dequantize_kv(quantize_kv(KVCache(keys=keys, values=values), "int4", residual_tokens=0, rotate_keys=False))
    key_err, value_err = (out.keys - keys).abs(), (out.values - values).abs()
    assert float(key_err[..., 5].max()) > 10 and float(torch.cat([key_err[..., :5], key_err[..., 6:]], -1).max()) < 0.5
    assert float(value_err[:, :, 7].max()) > 10 and float(value_err[:, :, 8:].max()) < 1.0


def test_first_token_is_kept_in_16_bits() -> None:
    kv = make_kv((2, 2, 6, 64))
    kv.keys[:, :, 0] *= 500.0  # the attention sink: far larger than the other tokens
    for c in ("int8", "int4"):
        q = quantize_kv(kv, c)
        out = dequantize_kv(from_bytes(to_bytes(q)))
        assert q.sink_tokens == 1 and q.sink_dtype == torch.float16
        assert torch.equal(out.keys[:, :, 0], kv.keys[:, :, 0].half().float())
        assert float((out.keys[:, :, 1:] - kv.keys[:, :, 1:]).abs().max()) < (0.05 if c == "int8" else 0.6)
    bf16 = make_kv((1, 1, 3, 64), dtype=torch.bfloat16)
    q = quantize_kv(bf16, "int4", sink_tokens=2)
    assert q.sink_dtype == torch.bfloat16 and torch.equal(dequantize_kv(q).keys[:, :, :2], bf16.keys[:, :, :2])
    assert quantize_kv(make_kv((1, 1, 2, 8)), "int4", sink_tokens=5).sink_tokens == 2  # all sink


def test_recent_tokens_travel_in_16_bits() -> None:
    """int4's recent-token window (KIVI's residual): the last 128 tokens come back to 16-bit rounding; the
    tokens before them on the 4-bit grid; short prompts are all window."""
    kv = make_kv((2, 2, 300, 64))
    q = quantize_kv(kv, "int4")
    assert (q.sink_tokens, q.residual_tokens, q.body_tokens) == (1, 128, 171)
    out = dequantize_kv(from_bytes(to_bytes(q)))
    recent = (out.values[:, :, -128:] - kv.values[:, :, -128:]).abs()
    assert torch.equal(out.values[:, :, -128:], kv.values[:, :, -128:].half().float())
    assert float(recent.max()) < 0.01 < float((out.values[:, :, 1:-128] - kv.values[:, :, 1:-128]).abs().max())
    assert quantize_kv(kv, "int8").residual_tokens == 0
    short = quantize_kv(make_kv((1, 1, 40, 64)), "int4")
    assert (short.sink_tokens, short.residual_tokens, short.body_tokens) == (1, 39, 0)
    assert_within_bound(kv, "int4", residual_tokens=128)
    assert_within_bound(kv, "int4", residual_tokens=7, key_block_tokens=16, sink_tokens=2)
    with pytest.raises(ValueError, match="residual_tokens"):
        quantize_kv(kv, "int4", residual_tokens=-1)


def test_int4_is_coarser_than_int8_and_both_are_close() -> None:
    kv = make_kv((4, 2, 16, 64))
    err = {c: float((dequantize_kv(quantize_kv(kv, c, residual_tokens=0)).keys - kv.keys).abs().max())
           for c in ("int8", "int4")}
    assert err["int8"] < 0.05 < err["int4"] < 0.8


def test_constant_groups_have_zero_scale_and_come_back_exactly() -> None:
    """Unrotated, constant key channels and constant value tokens come back exactly (scale 0, zero = value)."""
    keys = torch.full((1, 2, 3, 64), 1.5)
    values = torch.zeros((1, 2, 3, 64))
    kv = KVCache(keys=keys, values=values)
    for c in ("int8", "int4"):
        q = quantize_kv(kv, c, rotate_values=False, residual_tokens=0)
        out = dequantize_kv(from_bytes(to_bytes(q)))
        assert torch.equal(out.keys, keys) and torch.equal(out.values, values)
        assert bool((q.keys.scale == 0).all()) and bool((q.values.scale == 0).all())
        rotated = assert_within_bound(kv, c)  # rotated values: zeros stay zeros
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


def test_huge_values_fall_back_to_float32_parameters_and_sinks() -> None:
    kv = make_kv((1, 1, 4, 64), scale=1e6)
    for c in ("int8", "int4"):
        q = assert_within_bound(kv, c)
        assert q.param_dtype == torch.float32 and q.sink_dtype == torch.float32


def test_payload_sizes_and_ratios_vs_fp16() -> None:
    """At the coding workload's mean prompt (2,048 tokens) int4 sends >= 3x fewer bytes than fp16 (issue 12),
    every byte counted; each scheme's own count (`KvScheme.bytes_vs_fp16`) is the real payload."""
    kv = make_kv((4, 2, 2048, 64), dtype=torch.float16)
    fp16 = 2 * kv.keys.numel() * 2
    sizes = {c: len(to_bytes(quantize_kv(kv, c))) for c in ("none", "int8", "int4")}
    for c, n in sizes.items():
        assert n == payload_nbytes(quantize_kv(kv, c))
    assert sizes["none"] == fp16 + HEADER_BYTES
    assert fp16 / sizes["int8"] >= 1.8
    assert fp16 / sizes["int4"] >= 3.0
    for scheme in SCHEMES.values():
        actual = len(to_bytes(quantize_kv(kv, scheme))) - HEADER_BYTES
        assert actual / fp16 == pytest.approx(scheme.bytes_vs_fp16(2048, head_dim=64), rel=1e-9)


@pytest.mark.parametrize("compression", ["none", "int8", "int4"])
@pytest.mark.parametrize("num_tokens", [512, 37, 1000])
def test_cost_model_ratio_matches_the_wire_bytes(compression: str, num_tokens: int) -> None:
    """The cost model's compression ratio is the real payload size (32 layers x 8 kv heads x head_dim 128)."""
    kv = make_kv((32, 8, num_tokens, 128), dtype=torch.float16)
    actual = len(to_bytes(quantize_kv(kv, compression))) / (2 * kv.keys.numel() * 2)
    assert compression_ratio(compression, num_tokens=num_tokens) == pytest.approx(actual, rel=0.02)
    if num_tokens == 512:
        assert compression_ratio(compression) == pytest.approx(actual, rel=0.02)


def test_header_is_validated() -> None:
    blob = to_bytes(quantize_kv(make_kv(), "int4"))
    assert blob[4] == VERSION == 3 and HEADER_BYTES == 48
    with pytest.raises(ValueError, match="magic"):
        from_bytes(b"XXXX" + blob[4:])
    for old in (1, 2, 4):  # older layouts (v2: no recent-token window) and newer ones are refused, not misread
        with pytest.raises(ValueError, match=f"wire format version {old} is not supported .* reads version 3"):
            from_bytes(blob[:4] + bytes([old]) + blob[5:])
    v2_header = blob[:4] + bytes([2]) + blob[5:44]  # a version-2 payload is 4 bytes shorter in the header
    with pytest.raises(ValueError, match="version 2"):
        from_bytes(v2_header)
    with pytest.raises(ValueError, match="bytes"):
        from_bytes(blob[:-1])
    with pytest.raises(ValueError, match="header"):
        from_bytes(blob[:10])
    with pytest.raises(ValueError, match="flag"):
        from_bytes(blob[:9] + bytes([4]) + blob[10:])
    with pytest.raises(ValueError, match="compression"):
        quantize_kv(make_kv(), "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_kv(make_kv(), "int4", group_size=3)
    with pytest.raises(ValueError, match="key_block_tokens"):
        quantize_kv(make_kv(), "int4", key_block_tokens=0)


def test_payload_describes_itself() -> None:
    kv = make_kv((3, 2, 6, 32), dtype=torch.bfloat16, first_layer=4)
    q = from_bytes(to_bytes(quantize_kv(kv, "int4", group_size=16, key_block_tokens=2, residual_tokens=2)))
    assert (q.compression, q.shape, q.dtype, q.first_layer, q.group_size) == ("int4", (3, 2, 6, 32),
                                                                                torch.bfloat16, 4, 16)
    assert (q.sink_tokens, q.residual_tokens, q.key_block_tokens, q.rotate_values, q.rotate_keys) == (
        1, 2, 2, True, True)  # int4 rotates keys by default
    assert q.keys.data.dtype == torch.uint8 and q.keys.data.shape == (3 * 2 * 32 * 3 // 2,)
    assert q.keys.scale is not None and q.keys.scale.dtype == torch.float16 and q.keys.scale.shape == (6, 32, 2)
    assert q.values.scale is not None and q.values.scale.shape == (3 * 2 * 3, 2)
    assert q.keys.sink is not None and q.keys.sink.shape == (3, 2, 1, 32) and q.sink_dtype == torch.bfloat16
    assert q.values.recent is not None and q.values.recent.shape == (3, 2, 2, 32)
    assert quantize_kv(kv, "int8").keys.data.dtype == torch.uint8
    assert quantize_kv(kv, "int8").param_dtype == torch.float32
    assert not quantize_kv(kv, "int4", group_size=16, rotate_values=False).rotate_values
    assert not from_bytes(to_bytes(quantize_kv(make_kv((1, 1, 2, 12)), "int4"))).rotate_values  # group of 12
    assert from_bytes(to_bytes(quantize_kv(kv, "int4", rotate_keys=True))).rotate_keys


def test_empty_and_non_contiguous_caches() -> None:
    empty = KVCache(keys=torch.zeros(2, 2, 0, 64), values=torch.zeros(2, 2, 0, 64))
    for c in ("none", "int8", "int4"):
        out = dequantize_kv(from_bytes(to_bytes(quantize_kv(empty, c))))
        assert out.keys.shape == (2, 2, 0, 64)
    big = make_kv((2, 2, 10, 64))
    view = KVCache(keys=big.keys[:, :, :4], values=big.values[:, :, :4])
    out = dequantize_kv(from_bytes(to_bytes(quantize_kv(view, "none"))))
    assert torch.equal(out.keys, big.keys[:, :, :4])
    q = assert_within_bound(view, "int4")
    assert q.shape == (2, 2, 4, 64)


def test_codecs_match_the_workers_codec() -> None:
    kv = make_kv()
    codecs = profile_codecs()
    assert sorted(codecs) == ["int4", "int8", "none"]
    for name, codec in codecs.items():
        assert isinstance(codec, KvQuantCodec)
        blob = codec.encode(kv)
        assert blob == QuantizeKvCodec(name).encode(kv)
        assert torch.equal(codec.decode(blob).keys, QuantizeKvCodec(name).decode(blob).keys)


def test_grid_view_is_in_the_rotated_coordinates() -> None:
    kv = make_kv((1, 1, 8, 64), scale=3.0)
    q = quantize_kv(kv, "int4", residual_tokens=0)
    want, grid, step = grid_view(q, kv.values, "values")
    assert torch.allclose(want @ hadamard(64), kv.values[:, :, 1:], atol=1e-5)  # H undoes the rotation
    assert bool(((grid - want).abs() <= step / 2 + 1e-5).all())
    assert float((grid - kv.values[:, :, 1:]).abs().max()) > float(step.max())  # not the cache's coordinates
    with pytest.raises(ValueError, match="none"):
        grid_view(quantize_kv(kv, "none"), kv.values, "values")
