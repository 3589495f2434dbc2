"""KV-cache quantisation for transfer: none (exact), int8 and int4 (asymmetric; int4 packed two per byte).

Scheme (format version 3), per pipeline stage's cache [layers, kv_heads, tokens, head_dim]; each level's knobs
come from the registry `runtime.kv.schemes` (`LEVEL_SCHEMES`), and any of them may be overridden per call:
  * sink tokens: the first `sink_tokens` tokens (default `costmodel.comm.KV_SINK_TOKENS` = 1) of keys and values
    are sent in 16 bits (the cache's own dtype when it is fp16/bf16, else fp16, or float32 when a value exceeds
    fp16's range). The first token is the attention sink: its keys and values are far larger than the rest, and
    leaving it in the key ranges stretched every channel's grid.
  * recent tokens (KIVI's residual window): the last `residual_tokens` tokens (int4: 128; int8: 0) are sent in
    16 bits the same way. The first decode steps attend to them most, so their error costs the most.
  * keys (KIVI-style, per channel): for each layer, head and channel, groups of `key_block_tokens` consecutive
    tokens (default `KV_KEY_BLOCK_TOKENS` = 128; the last block may be shorter) share one scale and zero point.
    Keys carry outlier *channels*, so a per-channel grid fits each channel's own range.
  * values (per token): groups of `group_size` consecutive elements along head_dim (default `KV_GROUP_SIZE` = 64),
    multiplied by the orthonormal Hadamard matrix H (H = H^T, H H = I) before quantising and by H again after,
    which spreads a group's outliers over the group. A head_dim that is not a multiple of the group size is padded
    by repeating its last element (which changes no group's min/max) and cut back on dequantisation.
  Rotation is a per-tensor flag (values on, keys off by default; rotated keys are rotated along head_dim the same
  way before their per-channel grid). On SmolLM2-135M this layout lowers the int4 cache's teacher-forced KL by ~4x
  against per-token groups for both tensors (see `cli_bench_kv` and the README's KV compression section).

Per group, with y the (rotated) group and L the top level (255 for int8, 15 for int4):
    zero point z = min(y) rounded *down* to the parameter dtype, s = (max(y) - z) / L rounded *up* to it,
    q = round((y - z) / s) in [0, L], y' = q * s + z.
Rounding the parameters outwards keeps every group inside the grid, so each element of y is off by at most s / 2
(plus float32 noise and the final rounding to the cache dtype). Unrotated, that is the bound on the cache itself;
rotated, it holds in the rotated coordinates, and since H is orthonormal a token's error over one group of g
channels has L2 norm at most sqrt(sum of (s/2)^2) over that group's elements (`grid_view` lays these out).
A constant group (unrotated) or an all-zero group gets s = 0 and comes back exactly. Sink tokens are off by at most
16-bit rounding (none in a 16-bit cache).

Parameter dtype: int4 keeps scales and zero points in fp16 (float32 only when values exceed the fp16 range);
int8, the fidelity level, keeps them in float32 (fp16 rounding of the grid flipped near-tied greedy tokens).

Bytes vs an fp16 cache, per (layer, head) at T tokens, head_dim D, S sinks and R recent tokens, Tb = T - S - R:
16-bit tokens 2*(S+R)*D*2; keys
Tb*D*b/8 + ceil(Tb/B)*D*2*p; values Tb*D*b/8 + Tb*(D/g)*2*p (b bits, p parameter bytes), plus a 44-byte header
per payload. int4 at T = 2048: 3.1x fewer bytes than fp16 (int8: 1.83x); at T = 512 2.2x, since the 16-bit
windows and the per-channel key parameters are paid once per prompt. `costmodel.comm.compression_ratio` and
`schemes.KvScheme.bytes_vs_fp16` make the same count.

Wire format (`to_bytes`, little-endian, no pickle): a 48-byte header
    magic b"TSKV", version u8 (3), compression u8, cache dtype u8, parameter dtype u8, sink dtype u8,
    flags u8 (bit 0: values rotated, bit 1: keys rotated), 2 pad bytes, then u32: group_size, key_block_tokens,
    sink_tokens, residual_tokens (both as applied: together at most tokens), first_layer, layers, kv_heads,
    tokens, head_dim;
then for keys and then values: sink [L, H, S, D] and recent tokens [L, H, R, D] in the sink dtype, codes (uint8, int4 two per byte, even index
in the low nibble, a last odd code padded with a zero nibble), scales, zero points. Key codes are channel-major
[L*H, C, Tb] with scales/zeros [L*H, C, blocks]; value codes token-major [L*H*Tb, G, g] with scales/zeros
[L*H*Tb, G] (C = head_dim, or padded to G*g when keys are rotated). The compression `none` sends each tensor
whole in the cache dtype. A decoder reads only its own version and rejects any other with a ValueError that
names both (version 2 lacked the recent-token window). Checksums belong to the transport (`runtime.kv.transport`).
"""

from __future__ import annotations

import functools
import math
import struct
import time
from dataclasses import dataclass, replace
from enum import Enum

import torch

from thunderserve.costmodel.comm import KV_KEY_BLOCK_TOKENS
from thunderserve.runtime.engine.base import KVCache
from thunderserve.runtime.kv.schemes import LEVEL_SCHEMES, KvScheme

MAGIC = b"TSKV"
VERSION = 3
_HEADER = struct.Struct("<4sBBBBBB2xIIIIIIIII")
HEADER_BYTES = _HEADER.size  # 48
_FLAG_VALUES_ROTATED = 1
_FLAG_KEYS_ROTATED = 2
COMPRESSIONS = ("none", "int8", "int4")
_LEVELS = {"int8": 255, "int4": 15}
_DTYPES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedTensor:
    """One of keys/values, quantised (layouts in the module docstring; `none` keeps only `data`)."""

    data: torch.Tensor  # none: the tensor [L, H, T, D]; else uint8 codes, flat (int4: two per byte)
    scale: torch.Tensor | None = None  # keys [L*H, C, blocks]; values [L*H*Tb, G]; fp16 or float32
    zero: torch.Tensor | None = None  # same shape: y ~ q * scale + zero
    sink: torch.Tensor | None = None  # [L, H, S, D] the first S tokens in 16 bits (or float32 out of fp16 range)
    recent: torch.Tensor | None = None  # [L, H, R, D] the last R tokens, in the sink's dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero, self.sink, self.recent)
                   if t is not None)


@dataclass(frozen=True)
class QuantizedKV:
    """A quantised `KVCache` (see the module docstring for the formats)."""

    compression: str  # "none" | "int8" | "int4"
    shape: tuple[int, int, int, int]  # [layers, kv_heads, tokens, head_dim] of keys (and of values)
    dtype: torch.dtype  # the cache's dtype, restored by dequantize_kv
    first_layer: int
    group_size: int  # value elements per group actually used (<= the requested size when head_dim is smaller)
    keys: QuantizedTensor
    values: QuantizedTensor
    sink_tokens: int = 0  # leading tokens sent in 16 bits (as applied: <= tokens; 0 for none)
    key_block_tokens: int = KV_KEY_BLOCK_TOKENS  # tokens per key group (per channel)
    rotate_values: bool = False  # value groups were multiplied by the Hadamard matrix
    rotate_keys: bool = False  # key rows were, along head_dim, before the per-channel grid
    residual_tokens: int = 0  # trailing tokens sent in 16 bits (as applied: <= tokens - sink_tokens)

    @property
    def body_tokens(self) -> int:
        """Tokens between the sink and the recent window: those on the int8/int4 grid."""
        return self.shape[2] - self.sink_tokens - self.residual_tokens

    @property
    def param_dtype(self) -> torch.dtype:
        s = self.keys.scale
        return torch.float16 if s is None else s.dtype

    @property
    def sink_dtype(self) -> torch.dtype:
        s = self.keys.sink
        return torch.float16 if s is None else s.dtype


def _compression_name(compression: str | Enum) -> str:
    name = str(compression.value if isinstance(compression, Enum) else compression).lower()
    if name not in COMPRESSIONS:
        raise ValueError(f"unknown KV compression '{compression}' (known: {', '.join(COMPRESSIONS)})")
    return name


def effective_group_size(head_dim: int, group_size: int) -> int:
    """The group size used for `head_dim`: the requested one, or head_dim (rounded up to even) if smaller."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even number >= 2, got {group_size}")
    return min(group_size, head_dim + head_dim % 2)


@functools.lru_cache(maxsize=16)
def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of size n (a power of two), float32; symmetric, H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def _round_to(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """x rounded to `dtype`, towards +inf (up) or -inf (down) where the nearest value would go the other way."""
    r = x.to(dtype)
    if dtype == x.dtype:
        return r
    bad = r.to(x.dtype) < x if up else r.to(x.dtype) > x
    if bool(bad.any()):
        target = torch.full_like(r, float("inf") if up else float("-inf"))
        r = torch.where(bad, torch.nextafter(r, target), r)
    return r


# ----- layouts: the body [L, H, Tb, D] <-> the quantised coordinates ------------------------------------------
def _padded_rows(x: torch.Tensor, g: int, rotate: bool, pad: bool) -> torch.Tensor:
    """[..., D] -> float32 [..., Dp]: D padded to a multiple of g by repeating its last element (when `pad` or
    `rotate`), each group of g multiplied by H when `rotate`."""
    y = x.to(torch.float32)
    d = y.shape[-1]
    extra = -d % g if (pad or rotate) else 0
    if extra:
        y = torch.cat([y, y[..., -1:].expand(*y.shape[:-1], extra)], dim=-1)
    if not rotate:
        return y
    groups = y.reshape(*y.shape[:-1], y.shape[-1] // g, g) @ hadamard(g).to(y.device)
    return groups.reshape(y.shape)


def _unrotate(y: torch.Tensor, g: int, rotate: bool, d: int) -> torch.Tensor:
    """Inverse of `_padded_rows` (H is its own inverse), cut back to d channels."""
    if rotate:
        y = (y.reshape(*y.shape[:-1], y.shape[-1] // g, g) @ hadamard(g).to(y.device)).reshape(y.shape)
    return y[..., :d]


def _key_groups(y: torch.Tensor, block: int) -> torch.Tensor:
    """Coordinates [L, H, Tb, C] -> groups [L*H, C, blocks, block] along tokens (last block padded by repeating
    its last token)."""
    L, H, tb, c = y.shape
    t = y.reshape(L * H, tb, c).transpose(1, 2)
    extra = -tb % block
    if extra:
        t = torch.cat([t, t[..., -1:].expand(*t.shape[:-1], extra)], dim=-1)
    return t.reshape(L * H, c, -(-tb // block), block)


def _grid(y: torch.Tensor, levels: int, param_dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, same shape as y), scale and zero point per group along y's last dim."""
    zero = _round_to(y.amin(-1), param_dtype, up=False)
    zf = zero.to(torch.float32)
    scale = _round_to((y.amax(-1) - zf) / levels, param_dtype, up=True)
    sf = scale.to(torch.float32)
    # a zero scale means the group sits on its zero point (y - z == 0), so dividing by 1 gives q = 0
    q = (y - zf[..., None]).div_(torch.where(sf > 0, sf, 1.0)[..., None]).round_()
    return q.clamp_(0, levels).to(torch.uint8), scale, zero


def _pack(codes: torch.Tensor, compression: str) -> torch.Tensor:
    flat = codes.reshape(-1)
    if compression == "int8":
        return flat
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack(data: torch.Tensor, compression: str, n: int) -> torch.Tensor:
    if compression == "int8":
        return data[:n]
    return torch.stack([data & 0xF, data >> 4], dim=-1).reshape(-1)[:n]


def _n_channels(d: int, g: int, rotate: bool) -> int:
    return d + (-d % g if rotate else 0)


def _num_codes(compression: str, n: int) -> int:
    return n if compression == "int8" else (n + 1) // 2


# ----- quantise / dequantise -----------------------------------------------------------------------------------
def _sink_dtype(kv: KVCache, s: int, r: int) -> torch.dtype:
    """The cache's dtype when 16-bit; else fp16 where every sink and recent value fits it, else the cache's."""
    dt = kv.keys.dtype
    if dt in (torch.float16, torch.bfloat16):
        return dt
    t = kv.keys.shape[2]
    windows = [x[:, :, a:b] for x in (kv.keys, kv.values) for a, b in ((0, s), (t - r, t)) if b > a]
    if not windows:
        return torch.float16
    absmax = max(float(w.abs().max()) for w in windows)
    return torch.float16 if absmax <= _FP16_MAX else dt


def _param_dtype(body_k: torch.Tensor, body_v: torch.Tensor, compression: str, g: int,
                 rotate_k: bool, rotate_v: bool) -> torch.dtype:
    """int8: float32. int4: fp16 when every scale and zero point fits it (it nearly always does), else float32."""
    if compression == "int8":
        return torch.float32
    if body_k.numel() == 0:
        return torch.float16
    grow = math.sqrt(g)
    absmax = max(float(body_k.abs().max()) * (grow if rotate_k else 1.0),
                 float(body_v.abs().max()) * (grow if rotate_v else 1.0))
    return torch.float16 if absmax < _FP16_MAX / 2 else torch.float32


def _scheme(compression: str | Enum | KvScheme, **overrides: int | bool | None) -> tuple[str, KvScheme | None]:
    """The level name and its scheme (None for `none`) with the given non-None knobs overridden."""
    scheme: KvScheme | None
    if isinstance(compression, KvScheme):
        name, scheme = compression.compression, compression
    else:
        name = _compression_name(compression)
        scheme = LEVEL_SCHEMES.get(name)
    if scheme is None:
        return name, None
    knobs = {k: v for k, v in overrides.items() if v is not None}
    return name, replace(scheme, **knobs) if knobs else scheme  # type: ignore[arg-type]


def quantize_kv(kv: KVCache, compression: str | Enum | KvScheme, group_size: int | None = None, *,
                rotate_values: bool | None = None, rotate_keys: bool | None = None, sink_tokens: int | None = None,
                key_block_tokens: int | None = None, residual_tokens: int | None = None) -> QuantizedKV:
    """Quantise a cache's keys and values (vectorised; see the module docstring for the scheme).

    `compression` is a level (its scheme from `schemes.LEVEL_SCHEMES`) or a `KvScheme`; the keyword knobs, when
    given, override the scheme's. Rotation applies only when the group size is a power of two (else ignored).
    """
    if sink_tokens is not None and sink_tokens < 0 or key_block_tokens is not None and key_block_tokens < 1:
        raise ValueError(f"sink_tokens must be >= 0 and key_block_tokens >= 1, got {sink_tokens}, "
                         f"{key_block_tokens}")
    if residual_tokens is not None and residual_tokens < 0:
        raise ValueError(f"residual_tokens must be >= 0, got {residual_tokens}")
    if group_size is not None and (group_size < 2 or group_size % 2):
        raise ValueError(f"group_size must be an even number >= 2, got {group_size}")
    name, scheme = _scheme(compression, group_size=group_size, rotate_values=rotate_values,
                           rotate_keys=rotate_keys, sink_tokens=sink_tokens, key_block_tokens=key_block_tokens,
                           residual_tokens=residual_tokens)
    if kv.keys.dim() != 4 or kv.keys.shape != kv.values.shape:
        raise ValueError(f"keys/values must share one [layers, kv_heads, tokens, head_dim] shape, got "
                         f"{tuple(kv.keys.shape)} and {tuple(kv.values.shape)}")
    if kv.keys.dtype not in _DTYPES or kv.values.dtype != kv.keys.dtype:
        raise ValueError(f"unsupported KV dtype {kv.keys.dtype} / {kv.values.dtype}")
    L, H, T, D = (int(n) for n in kv.keys.shape)
    shape = (L, H, T, D)
    if scheme is None:
        return QuantizedKV(compression=name, shape=shape, dtype=kv.keys.dtype,
                           first_layer=int(kv.first_layer), group_size=effective_group_size(D, group_size or 64),
                           keys=QuantizedTensor(kv.keys.detach().contiguous()),
                           values=QuantizedTensor(kv.values.detach().contiguous()),
                           key_block_tokens=key_block_tokens or KV_KEY_BLOCK_TOKENS)
    g = effective_group_size(D, scheme.group_size)
    pow2 = g & (g - 1) == 0
    rot_k, rot_v = scheme.rotate_keys and pow2, scheme.rotate_values and pow2
    block = scheme.key_block_tokens
    s = min(scheme.sink_tokens, T)
    r = min(scheme.residual_tokens, T - s)
    tb = T - s - r
    keys, values = kv.keys.detach(), kv.values.detach()
    body_k, body_v = keys[:, :, s:s + tb], values[:, :, s:s + tb]
    pdt, sdt = _param_dtype(body_k, body_v, name, g, rot_k, rot_v), _sink_dtype(kv, s, r)
    levels = _LEVELS[name]
    kq, ks, kz = _grid(_key_groups(_padded_rows(body_k, g, rot_k, pad=False), block), levels, pdt)
    kq = kq.reshape(L * H, kq.shape[1], kq.shape[2] * block)[..., :tb]  # drop the padding
    vrows = _padded_rows(body_v, g, rot_v, pad=True).reshape(L * H * tb, -(-D // g), g)
    vq, vs, vz = _grid(vrows, levels, pdt)

    def windows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :, :s].to(sdt).contiguous(), x[:, :, T - r:].to(sdt).contiguous()

    return QuantizedKV(
        compression=name, shape=shape, dtype=kv.keys.dtype, first_layer=int(kv.first_layer),
        group_size=g, sink_tokens=s, key_block_tokens=block, rotate_values=rot_v, rotate_keys=rot_k,
        residual_tokens=r,
        keys=QuantizedTensor(_pack(kq, name), ks, kz, *windows(keys)),
        values=QuantizedTensor(_pack(vq, name), vs, vz, *windows(values)))


def _key_grid(q: QuantizedKV) -> torch.Tensor:
    """Key grid values in the quantised coordinates, float32 [L, H, Tb, C]."""
    t = q.keys
    assert t.scale is not None and t.zero is not None
    L, H, T, _ = q.shape
    lh, c, blocks = t.scale.shape
    tb = q.body_tokens
    codes = _unpack(t.data, q.compression, lh * c * tb).reshape(lh, c, tb)
    codes = torch.nn.functional.pad(codes, (0, blocks * q.key_block_tokens - tb))
    block = q.key_block_tokens
    y = (codes.reshape(lh, c, blocks, block).to(torch.float32) * t.scale.to(torch.float32)[..., None]
         + t.zero.to(torch.float32)[..., None])
    return y.reshape(lh, c, blocks * block)[..., :tb].transpose(1, 2).reshape(L, H, tb, c)


def _value_grid(q: QuantizedKV) -> torch.Tensor:
    """Value grid values in the quantised coordinates, float32 [L, H, Tb, G*g]."""
    t = q.values
    assert t.scale is not None and t.zero is not None
    L, H, T, _ = q.shape
    n, groups = t.scale.shape
    codes = _unpack(t.data, q.compression, n * groups * q.group_size).reshape(n, groups, q.group_size)
    y = codes.to(torch.float32) * t.scale.to(torch.float32)[..., None] + t.zero.to(torch.float32)[..., None]
    return y.reshape(L, H, q.body_tokens, groups * q.group_size)


def _dequantize(q: QuantizedKV, which: str) -> torch.Tensor:
    t: QuantizedTensor = getattr(q, which)
    if q.compression == "none":
        return t.data.to(q.dtype).reshape(q.shape)
    assert t.sink is not None and t.recent is not None
    grid, rot = (_key_grid(q), q.rotate_keys) if which == "keys" else (_value_grid(q), q.rotate_values)
    out = torch.empty(q.shape, dtype=q.dtype, device=grid.device)
    s, end = q.sink_tokens, q.sink_tokens + q.body_tokens
    out[:, :, :s] = t.sink
    out[:, :, s:end] = _unrotate(grid, q.group_size, rot, q.shape[3])
    out[:, :, end:] = t.recent
    return out


def dequantize_kv(q: QuantizedKV, device: torch.device | str | None = None) -> KVCache:
    """The cache back, in its original dtype (on `device`, default where the quantised data is)."""
    keys, values = _dequantize(q, "keys"), _dequantize(q, "values")
    if device is not None:
        keys, values = keys.to(device), values.to(device)
    return KVCache(keys=keys, values=values, first_layer=q.first_layer)


def grid_view(q: QuantizedKV, x: torch.Tensor, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For checking the error bound: (x's body in q's quantised coordinates, q's grid values there, each
    element's grid step), all float32 [L, H, Tb, C] and aligned element by element. `x` is the original keys or
    values ([L, H, T, D]); `which` names it."""
    if q.compression == "none":
        raise ValueError("the compression 'none' has no grid")
    t: QuantizedTensor = getattr(q, which)
    assert t.scale is not None
    body = x[:, :, q.sink_tokens:q.sink_tokens + q.body_tokens]
    if which == "keys":
        want = _padded_rows(body, q.group_size, q.rotate_keys, pad=False)
        step = t.scale.to(torch.float32).repeat_interleave(q.key_block_tokens, -1)[..., : q.body_tokens]
        return want, _key_grid(q), step.transpose(1, 2).reshape(want.shape)
    want = _padded_rows(body, q.group_size, q.rotate_values, pad=True)
    step = t.scale.to(torch.float32).repeat_interleave(q.group_size, -1)
    return want, _value_grid(q), step.reshape(want.shape)


# ----- wire format ---------------------------------------------------------------------------------------------
def _layout(q: QuantizedKV) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of sink, recent, codes, scale, zero for keys, then for values (empty shape: absent)."""
    L, H, T, D = q.shape
    if q.compression == "none":
        whole = [(torch.uint8, ()), (torch.uint8, ()), (q.dtype, q.shape), (torch.uint8, ()), (torch.uint8, ())]
        return whole + whole
    g, s, pdt = q.group_size, q.sink_tokens, q.param_dtype
    tb, groups = q.body_tokens, -(-D // g)
    c = _n_channels(D, g, q.rotate_keys)
    blocks = -(-tb // q.key_block_tokens)
    windows = [(q.sink_dtype, (L, H, s, D)), (q.sink_dtype, (L, H, q.residual_tokens, D))]
    return [*windows, (torch.uint8, (_num_codes(q.compression, L * H * c * tb),)), (pdt, (L * H, c, blocks)),
            (pdt, (L * H, c, blocks)),
            *windows, (torch.uint8, (_num_codes(q.compression, L * H * tb * groups * g),)),
            (pdt, (L * H * tb, groups)), (pdt, (L * H * tb, groups))]


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 0


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return _numel(shape) * torch.empty(0, dtype=dtype).element_size()


def payload_nbytes(q: QuantizedKV) -> int:
    """len(to_bytes(q)), without building it."""
    return _HEADER.size + q.keys.nbytes() + q.values.nbytes()


def _raw(t: torch.Tensor | None) -> bytes:
    if t is None or t.numel() == 0:
        return b""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def to_bytes(q: QuantizedKV) -> bytes:
    """The self-describing binary payload (header + raw arrays; see the module docstring)."""
    L, H, T, D = q.shape
    flags = (_FLAG_VALUES_ROTATED if q.rotate_values else 0) | (_FLAG_KEYS_ROTATED if q.rotate_keys else 0)
    head = _HEADER.pack(MAGIC, VERSION, COMPRESSIONS.index(q.compression), _DTYPES[q.dtype],
                        _DTYPES[q.param_dtype], _DTYPES[q.sink_dtype], flags, q.group_size, q.key_block_tokens,
                        q.sink_tokens, q.residual_tokens, q.first_layer, L, H, T, D)
    parts = [head]
    for t in (q.keys, q.values):
        parts += [_raw(t.sink), _raw(t.recent), _raw(t.data), _raw(t.scale), _raw(t.zero)]
    return b"".join(parts)


def from_bytes(payload: bytes | bytearray | memoryview) -> QuantizedKV:
    """Parse `to_bytes` output; ValueError on a bad magic, version, code or length."""
    buf = bytearray(payload)
    if len(buf) >= 5 and buf[:4] == MAGIC and buf[4] != VERSION:  # checked first: older headers are shorter
        raise ValueError(f"KV payload wire format version {buf[4]} is not supported by this decoder (it reads "
                         f"version {VERSION} only); run the same ThunderServe version on prefill and decode workers")
    if len(buf) < _HEADER.size:
        raise ValueError(f"KV payload of {len(buf)} bytes is shorter than its header")
    magic, version, comp, dt, pdt, sdt, flags, g, block, s, r, first, L, H, T, D = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ValueError(f"not a KV payload (magic {magic!r})")
    if (comp >= len(COMPRESSIONS) or any(c not in _DTYPE_OF for c in (dt, pdt, sdt))
            or flags & ~(_FLAG_VALUES_ROTATED | _FLAG_KEYS_ROTATED)):
        raise ValueError("corrupt KV payload header (unknown compression, dtype or flag)")
    rot_v, rot_k = bool(flags & _FLAG_VALUES_ROTATED), bool(flags & _FLAG_KEYS_ROTATED)
    if g < 2 or g % 2 or ((rot_v or rot_k) and g & (g - 1)) or block < 1 or s + r > T:
        raise ValueError(f"corrupt KV payload header (group size {g}, key block {block}, sink tokens {s}, "
                         f"recent tokens {r})")
    name, dtype = COMPRESSIONS[comp], _DTYPE_OF[dt]
    # a skeleton with the header's facts, to share `_layout` with the encoder
    stub = torch.empty(0, dtype=_DTYPE_OF[pdt])
    skeleton = QuantizedKV(compression=name, shape=(L, H, T, D), dtype=dtype, first_layer=first, group_size=g,
                           keys=QuantizedTensor(stub, stub, stub, torch.empty(0, dtype=_DTYPE_OF[sdt])),
                           values=QuantizedTensor(stub), sink_tokens=s, key_block_tokens=block,
                           rotate_values=rot_v, rotate_keys=rot_k, residual_tokens=r)
    layout = _layout(skeleton)
    expected = _HEADER.size + sum(_nbytes(t, shp) for t, shp in layout)
    if len(buf) != expected:
        raise ValueError(f"KV payload is {len(buf)} bytes, its header says {expected}")
    offset = _HEADER.size
    tensors: list[torch.Tensor | None] = []
    for t_dtype, t_shape in layout:
        if not t_shape:
            tensors.append(None)
            continue
        nbytes = _nbytes(t_dtype, t_shape)
        raw = (torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes
               else torch.empty(0, dtype=torch.uint8))
        tensors.append(raw.view(t_dtype).reshape(t_shape))
        offset += nbytes
    ks, kr, kd, kscale, kz, vs, vr, vd, vscale, vz = tensors
    assert kd is not None and vd is not None
    return QuantizedKV(compression=name, shape=(L, H, T, D), dtype=dtype, first_layer=first, group_size=g,
                       keys=QuantizedTensor(kd, kscale, kz, ks, kr), values=QuantizedTensor(vd, vscale, vz, vs, vr),
                       sink_tokens=s, key_block_tokens=block, rotate_values=rot_v, rotate_keys=rot_k,
                       residual_tokens=r)


# ----- codecs (the profiler's and the benchmark's view) ---------------------------------------------------------
class KvQuantCodec:
    """KVCache <-> bytes at one compression level (quantize + to_bytes; from_bytes + dequantize)."""

    def __init__(self, compression: str | Enum | KvScheme, group_size: int | None = None) -> None:
        self.compression: str | KvScheme = (compression if isinstance(compression, KvScheme)
                                            else _compression_name(compression))
        self.group_size = group_size

    def encode(self, kv: KVCache) -> bytes:
        return to_bytes(quantize_kv(kv, self.compression, self.group_size))

    def decode(self, data: bytes) -> KVCache:
        return dequantize_kv(from_bytes(data))


def profile_codecs() -> dict[str, KvQuantCodec]:
    """One codec per compression level, for `profiling.run.kv_codecs`."""
    return {name: KvQuantCodec(name) for name in COMPRESSIONS}


def time_codec(kv: KVCache, compression: str | KvScheme, repeats: int = 5, group_size: int | None = None
               ) -> tuple[float, float]:
    """Median seconds of (quantize_kv, dequantize_kv) on `kv` (after one warm-up of each)."""
    q = quantize_kv(kv, compression, group_size)
    dequantize_kv(q)
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q = quantize_kv(kv, compression, group_size)
        t1 = time.perf_counter()
        dequantize_kv(q)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return sorted(enc)[len(enc) // 2], sorted(dec)[len(dec) // 2]
