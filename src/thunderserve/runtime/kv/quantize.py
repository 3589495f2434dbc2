"""Group-wise KV-cache quantisation for transfer: none (exact), int8 and int4 (asymmetric; int4 packed).

Groups are `group_size` consecutive elements along head_dim (default `costmodel.comm.KV_GROUP_SIZE` = 64). A
head_dim that is not a multiple of the group size is padded at the end by repeating its last element (which
changes no group's min/max) and cut back on dequantisation.

Rotation (default on, when the group size is a power of two): each group is multiplied by the orthonormal
Hadamard matrix H (H = H^T, H H = I) before quantising and by H again after dequantising. Keys carry a few
outlier channels; the rotation spreads them over the group, so the grid is no longer stretched by one channel.
On SmolLM2-135M this is what makes int8 greedy-identical to the uncompressed cache (see `cli_bench_kv`). It
costs no bytes (H is fixed) and is recorded in the header.

Per group, with y the (rotated) group and L the top level (255 for int8, 15 for int4):
    zero point z = min(y) rounded *down* to the parameter dtype, s = (max(y) - z) / L rounded *up* to it,
    q = round((y - z) / s) in [0, L] (uint8; int4 packs two per byte, even index in the low nibble),
    y' = q * s + z.
Rounding the parameters outwards keeps every group inside the grid, so each element of y is off by at most s / 2
(plus float32 noise and the final rounding to the cache dtype). Without rotation that is the bound on the cache
itself; with rotation it holds in the rotated coordinates, and a group's L2 error is at most sqrt(g) * s / 2 in
both. A constant group (unrotated) or an all-zero group gets s = 0 and comes back exactly (z holds the value,
exact when it is a number of the parameter dtype).

Parameter dtype: int4 keeps scales and zero points in fp16 (float32 only when values exceed the fp16 range);
int8, the fidelity level, keeps them in float32: the fp16 rounding of the grid was enough to flip near-tied
greedy tokens on SmolLM2 (free-running agreement 0.95 / 0.91 / 0.88 on three prompt sets with fp16 parameters,
1.0 / 1.0 / 0.88 with float32). Bytes per group of 64 values: int8 64 + 8, int4 32 + 4, vs 128 in fp16, i.e.
1.78x and 3.56x smaller. (The cost model's int8 ratio assumes an fp16 scale only, 64 + 2 bytes: 8% optimistic.)

Wire format (`to_bytes`, little-endian, no pickle): a 36-byte header
    magic b"TSKV", version u8, compression u8, cache dtype u8, parameter dtype u8, flags u8 (bit 0: rotated),
    3 pad bytes, group_size u32, first_layer u32, layers u32, kv_heads u32, tokens u32, head_dim u32
then keys' data, scales, zero points and values' data, scales, zero points as raw arrays whose sizes follow
from the header (absent parts take no bytes).
"""

from __future__ import annotations

import functools
import math
import struct
import time
from dataclasses import dataclass
from enum import Enum

import torch

from thunderserve.costmodel.comm import KV_GROUP_SIZE
from thunderserve.runtime.engine.base import KVCache

MAGIC = b"TSKV"
VERSION = 1
_HEADER = struct.Struct("<4sBBBBB3xIIIIII")
HEADER_BYTES = _HEADER.size  # 36
_FLAG_ROTATED = 1
COMPRESSIONS = ("none", "int8", "int4")
_LEVELS = {"int8": 255, "int4": 15}
_DTYPES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}
_FP16_MAX = 65504.0


@dataclass(frozen=True)
class QuantizedTensor:
    """One of keys/values, quantised. N = layers * kv_heads * tokens rows, G groups per row of g elements."""

    data: torch.Tensor  # none: the tensor itself [L, H, T, D]; int8: uint8 [N, G, g]; int4: uint8 [N, G, g/2]
    scale: torch.Tensor | None = None  # [N, G] per-group scale (fp16, or fp32 out of fp16 range); not for none
    zero: torch.Tensor | None = None  # [N, G] per-group zero point: y ~ q * scale + zero

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero) if t is not None)


@dataclass(frozen=True)
class QuantizedKV:
    """A quantised `KVCache` (see the module docstring for the formats)."""

    compression: str  # "none" | "int8" | "int4"
    shape: tuple[int, int, int, int]  # [layers, kv_heads, tokens, head_dim] of keys (and of values)
    dtype: torch.dtype  # the cache's dtype, restored by dequantize_kv
    first_layer: int
    group_size: int  # elements per group actually used (<= the requested size when head_dim is smaller)
    keys: QuantizedTensor
    values: QuantizedTensor
    rotated: bool = False  # groups were multiplied by the Hadamard matrix before quantising

    @property
    def param_dtype(self) -> torch.dtype:
        s = self.keys.scale
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


def rotated_groups(x: torch.Tensor, g: int, rotate: bool) -> torch.Tensor:
    """[L, H, T, D] -> float32 [N, G, g] groups (D padded by repeating its last element), rotated if asked."""
    d = x.shape[-1]
    rows = x.reshape(-1, d).to(torch.float32)
    pad = -d % g
    if pad:
        rows = torch.cat([rows, rows[:, -1:].expand(-1, pad)], dim=1)
    groups = rows.reshape(rows.shape[0], (d + pad) // g, g)
    return groups @ hadamard(g).to(groups.device) if rotate else groups


def _quantize_tensor(x: torch.Tensor, compression: str, g: int, param_dtype: torch.dtype, rotate: bool
                     ) -> QuantizedTensor:
    if compression == "none":
        return QuantizedTensor(data=x.contiguous())
    y = rotated_groups(x, g, rotate)
    zero = _round_to(y.amin(-1), param_dtype, up=False)
    zf = zero.to(torch.float32)
    scale = _round_to((y.amax(-1) - zf) / _LEVELS[compression], param_dtype, up=True)
    sf = scale.to(torch.float32)
    # a zero scale means the group sits on its zero point (y - z == 0), so dividing by 1 gives q = 0
    q = (y - zf[..., None]).div_(torch.where(sf > 0, sf, 1.0)[..., None]).round_()
    q = q.clamp_(0, _LEVELS[compression]).to(torch.uint8)
    if compression == "int4":
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return QuantizedTensor(data=q, scale=scale, zero=zero)


def dequantize_groups(t: QuantizedTensor, compression: str) -> torch.Tensor:
    """The grid values q * s + z, float32 [N, G, g], in the quantised (rotated, if so) coordinates."""
    assert t.scale is not None and t.zero is not None
    q = t.data
    if compression == "int4":
        q = torch.stack([q & 0xF, q >> 4], dim=-1).reshape(*q.shape[:-1], 2 * q.shape[-1])
    return q.to(torch.float32) * t.scale.to(torch.float32)[..., None] + t.zero.to(torch.float32)[..., None]


def _dequantize_tensor(t: QuantizedTensor, compression: str, shape: tuple[int, int, int, int],
                       dtype: torch.dtype, rotated: bool) -> torch.Tensor:
    if compression == "none":
        return t.data.to(dtype).reshape(shape)
    y = dequantize_groups(t, compression)
    if rotated:
        y = y @ hadamard(y.shape[-1]).to(y.device)
    d = shape[-1]
    return y.reshape(y.shape[0], y.shape[1] * y.shape[2])[:, :d].to(dtype).reshape(shape)


def _param_dtype(kv: KVCache, compression: str, g: int, rotate: bool) -> torch.dtype:
    """int8: float32. int4: fp16 when every scale and zero point fits it (it nearly always does), else float32."""
    if compression == "int8":
        return torch.float32
    if compression == "none" or kv.keys.numel() == 0:
        return torch.float16
    absmax = max(float(kv.keys.abs().max()), float(kv.values.abs().max())) * (math.sqrt(g) if rotate else 1.0)
    return torch.float16 if absmax < _FP16_MAX / 2 else torch.float32


def quantize_kv(kv: KVCache, compression: str | Enum, group_size: int = KV_GROUP_SIZE,
                rotate: bool = True) -> QuantizedKV:
    """Quantise a cache's keys and values (vectorised; see the module docstring for the formats).

    `rotate` applies the Hadamard rotation when the group size is a power of two (ignored otherwise).
    """
    name = _compression_name(compression)
    if kv.keys.dim() != 4 or kv.keys.shape != kv.values.shape:
        raise ValueError(f"keys/values must share one [layers, kv_heads, tokens, head_dim] shape, got "
                         f"{tuple(kv.keys.shape)} and {tuple(kv.values.shape)}")
    if kv.keys.dtype not in _DTYPES or kv.values.dtype != kv.keys.dtype:
        raise ValueError(f"unsupported KV dtype {kv.keys.dtype} / {kv.values.dtype}")
    shape = tuple(int(n) for n in kv.keys.shape)
    g = effective_group_size(shape[3], group_size)
    rot = rotate and name != "none" and g & (g - 1) == 0
    pdt = _param_dtype(kv, name, g, rot)
    qk = _quantize_tensor(kv.keys.detach(), name, g, pdt, rot)
    qv = _quantize_tensor(kv.values.detach(), name, g, pdt, rot)
    return QuantizedKV(compression=name, shape=shape, dtype=kv.keys.dtype,  # type: ignore[arg-type]
                       first_layer=int(kv.first_layer), group_size=g, keys=qk, values=qv, rotated=rot)


def dequantize_kv(q: QuantizedKV, device: torch.device | str | None = None) -> KVCache:
    """The cache back, in its original dtype (on `device`, default where the quantised data is)."""
    keys = _dequantize_tensor(q.keys, q.compression, q.shape, q.dtype, q.rotated)
    values = _dequantize_tensor(q.values, q.compression, q.shape, q.dtype, q.rotated)
    if device is not None:
        keys, values = keys.to(device), values.to(device)
    return KVCache(keys=keys, values=values, first_layer=q.first_layer)


# ----- wire format ---------------------------------------------------------------------------------------------
def _layout(compression: str, shape: tuple[int, int, int, int], g: int, pdt: torch.dtype, dtype: torch.dtype
            ) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of data, scale, zero for one of keys/values (empty shape: absent)."""
    if compression == "none":
        return [(dtype, shape), (pdt, ()), (pdt, ())]
    n = shape[0] * shape[1] * shape[2]
    groups = -(-shape[3] // g) if shape[3] else 0
    per_group = g if compression == "int8" else g // 2
    return [(torch.uint8, (n, groups, per_group)), (pdt, (n, groups)), (pdt, (n, groups))]


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out if shape else 0


def payload_nbytes(q: QuantizedKV) -> int:
    """len(to_bytes(q)), without building it."""
    return _HEADER.size + q.keys.nbytes() + q.values.nbytes()


def _raw(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def to_bytes(q: QuantizedKV) -> bytes:
    """The self-describing binary payload (header + raw arrays; see the module docstring)."""
    L, H, T, D = q.shape
    head = _HEADER.pack(MAGIC, VERSION, COMPRESSIONS.index(q.compression), _DTYPES[q.dtype],
                        _DTYPES[q.param_dtype], _FLAG_ROTATED if q.rotated else 0, q.group_size, q.first_layer,
                        L, H, T, D)
    parts = [head]
    for t in (q.keys, q.values):
        parts += [_raw(t.data), b"" if t.scale is None else _raw(t.scale), b"" if t.zero is None else _raw(t.zero)]
    return b"".join(parts)


def from_bytes(payload: bytes | bytearray | memoryview) -> QuantizedKV:
    """Parse `to_bytes` output; ValueError on a bad magic, version, code or length."""
    buf = bytearray(payload)
    if len(buf) < _HEADER.size:
        raise ValueError(f"KV payload of {len(buf)} bytes is shorter than its header")
    magic, version, comp, dt, pdt, flags, g, first, L, H, T, D = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ValueError(f"not a KV payload (magic {magic!r})")
    if version != VERSION:
        raise ValueError(f"KV payload version {version} is not supported (expected {VERSION})")
    if comp >= len(COMPRESSIONS) or dt not in _DTYPE_OF or pdt not in _DTYPE_OF or flags & ~_FLAG_ROTATED:
        raise ValueError("corrupt KV payload header (unknown compression or dtype code)")
    compression, dtype, param_dtype = COMPRESSIONS[comp], _DTYPE_OF[dt], _DTYPE_OF[pdt]
    shape = (L, H, T, D)
    rotated = bool(flags & _FLAG_ROTATED)
    if g < 2 or g % 2 or (rotated and g & (g - 1)):
        raise ValueError(f"corrupt KV payload header (group size {g})")
    layout = _layout(compression, shape, g, param_dtype, dtype)
    expected = _HEADER.size + 2 * sum(_numel(s) * torch.empty(0, dtype=t).element_size() for t, s in layout)
    if len(buf) != expected:
        raise ValueError(f"KV payload is {len(buf)} bytes, its header says {expected}")
    offset = _HEADER.size
    tensors: list[torch.Tensor | None] = []
    for _ in range(2):
        for t_dtype, t_shape in layout:
            if not t_shape:
                tensors.append(None)
                continue
            nbytes = _numel(t_shape) * torch.empty(0, dtype=t_dtype).element_size()
            raw = (torch.frombuffer(buf, dtype=torch.uint8, count=nbytes, offset=offset) if nbytes
                   else torch.empty(0, dtype=torch.uint8))
            tensors.append(raw.view(t_dtype).reshape(t_shape))
            offset += nbytes
    kd, ks, kz, vd, vs, vz = tensors
    assert kd is not None and vd is not None
    return QuantizedKV(compression=compression, shape=shape, dtype=dtype, first_layer=first, group_size=g,
                       keys=QuantizedTensor(kd, ks, kz), values=QuantizedTensor(vd, vs, vz), rotated=rotated)


# ----- codecs (the profiler's and the benchmark's view) ---------------------------------------------------------
class KvQuantCodec:
    """KVCache <-> bytes at one compression level (quantize + to_bytes; from_bytes + dequantize)."""

    def __init__(self, compression: str | Enum, group_size: int = KV_GROUP_SIZE, rotate: bool = True) -> None:
        self.compression = _compression_name(compression)
        self.group_size = group_size
        self.rotate = rotate

    def encode(self, kv: KVCache) -> bytes:
        return to_bytes(quantize_kv(kv, self.compression, self.group_size, self.rotate))

    def decode(self, data: bytes) -> KVCache:
        return dequantize_kv(from_bytes(data))


def profile_codecs() -> dict[str, KvQuantCodec]:
    """One codec per compression level, for `profiling.run.kv_codecs`."""
    return {name: KvQuantCodec(name) for name in COMPRESSIONS}


def time_codec(kv: KVCache, compression: str, repeats: int = 5, group_size: int = KV_GROUP_SIZE
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
