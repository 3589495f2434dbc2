"""Reader for the non-GEMM parts of Vidur profiles: attention kernels and per-layer element-wise kernels.

* `attention.csv` (`<gpu>/<org>/<model>/attention.csv`): per-layer FlashAttention medians in milliseconds,
  `time_stats.attn_prefill.median` for one prompt chunk of `prefill_chunk_size` tokens after `kv_cache_size`
  already-prefilled tokens (`is_prefill` True), `time_stats.attn_decode.median` for `batch_size` sequences
  each holding `kv_cache_size` tokens (`is_prefill` False). Only TP-1 rows are read.
* `mlp.csv` rows also give per-layer element-wise kernel times (two norms, rotary, activation, two adds) and
  the four GEMMs, by `num_tokens`: `LayerOps` keeps both per (GPU, model, TP) for the step-level fidelity.
Every value is checked like `profiling.vidur` does (a bad cell is a SpecError naming file and column).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from thunderserve.costmodel.opfit import AttentionFit, ElementwiseFit, fit_attention, fit_elementwise
from thunderserve.costmodel.perf import elementwise_bytes
from thunderserve.errors import SpecError
from thunderserve.profiling.vidur import (
    DTYPE_BYTES,
    ELEMENTWISE_OPS,
    SHAPE_COLUMNS,
    GemmOp,
    ProfileFile,
    _integer,
    _number,
    _read_rows,
    time_column,
)

ATTENTION_FILE = "attention.csv"
_ATTN_COLUMNS = ("n_embd", "n_q_head", "n_kv_head", "num_tensor_parallel_workers", "batch_size",
                 "prefill_chunk_size", "kv_cache_size", "is_prefill")


@dataclass(frozen=True)
class AttentionProfile:
    """Measured per-layer attention kernels of one GPU type and model (TP 1), seconds."""

    gpu: str
    model: str
    peak_flops_s: float
    bandwidth_bytes_s: float
    hidden: int
    kv_bytes_per_token: float  # per layer (fp16 keys and values of the KV heads)
    prefill_chunk: np.ndarray
    prefill_done: np.ndarray
    prefill_s: np.ndarray
    decode_batch: np.ndarray
    decode_kv: np.ndarray
    decode_s: np.ndarray


@dataclass(frozen=True)
class LayerOps:
    """Measured per-layer GEMM and element-wise time of one GPU type, model and TP degree, by token count."""

    gpu: str
    model: str
    tp: int
    bandwidth_bytes_s: float
    tokens: np.ndarray  # sorted
    gemm_s: np.ndarray  # the four linear ops
    elementwise_s: np.ndarray  # norms, rotary, activation, adds (weighted by how often each runs)
    elementwise_bytes_per_token: float

    def at(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(GEMM, element-wise) time at any token counts: linear interpolation between measured sizes."""
        t = np.asarray(tokens, dtype=float)
        return np.interp(t, self.tokens, self.gemm_s), np.interp(t, self.tokens, self.elementwise_s)


def attention_files(files: Sequence[ProfileFile]) -> list[ProfileFile]:
    """The `attention.csv` next to each discovered `mlp.csv`, where one exists."""
    return [ProfileFile(f.path.with_name(ATTENTION_FILE), f.gpu_folder, f.gpu, f.model_folder, f.model)
            for f in files if f.path.with_name(ATTENTION_FILE).is_file()]


def read_attention(pf: ProfileFile) -> AttentionProfile:
    path = pf.path
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as exc:
        raise SpecError(f"cannot read file ({exc.strerror})", source=str(path)) from None
    for column in (*_ATTN_COLUMNS, time_column("attn_prefill"), time_column("attn_decode")):
        if column not in header:
            raise SpecError("missing column (not a Vidur attention.csv profile?)", source=str(path), field=column)
    pre: list[tuple[int, int, float]] = []
    dec: list[tuple[int, int, float]] = []
    hidden = heads = kv_heads = 0
    for i, row in enumerate(rows, start=2):
        if _integer(row.get("num_tensor_parallel_workers"), path, "num_tensor_parallel_workers", i) != 1:
            continue
        hidden = _integer(row.get("n_embd"), path, "n_embd", i)
        heads = _integer(row.get("n_q_head"), path, "n_q_head", i)
        kv_heads = _integer(row.get("n_kv_head"), path, "n_kv_head", i)
        kv = int(_number(row.get("kv_cache_size"), path, "kv_cache_size", i, positive=False))
        if str(row.get("is_prefill", "")).strip().lower() == "true":
            c = _integer(row.get("prefill_chunk_size"), path, "prefill_chunk_size", i)
            ms = _number(row.get(time_column("attn_prefill")), path, time_column("attn_prefill"), i, positive=True)
            pre.append((c, kv, ms * 1e-3))
        else:
            b = _integer(row.get("batch_size"), path, "batch_size", i)
            ms = _number(row.get(time_column("attn_decode")), path, time_column("attn_decode"), i, positive=True)
            dec.append((b, kv, ms * 1e-3))
    if not pre or not dec:
        raise SpecError("needs TP-1 rows of both prefill and decode attention", source=str(path))
    p, d = np.array(pre, dtype=float), np.array(dec, dtype=float)
    return AttentionProfile(pf.gpu.name, pf.model, pf.gpu.fp16_tflops * 1e12, pf.gpu.memory_bandwidth_gbs * 1e9,
                            hidden, 2.0 * kv_heads * (hidden // heads) * DTYPE_BYTES,
                            p[:, 0], p[:, 1], p[:, 2], d[:, 0], d[:, 1], d[:, 2])


def read_layer_ops(pf: ProfileFile) -> list[LayerOps]:
    """Per TP degree, the GEMM and element-wise time of one layer by token count (medians of duplicates)."""
    header, rows = _read_rows(pf.path)
    cols = [time_column(op) for op in ELEMENTWISE_OPS]
    if not all(c in header for c in cols):
        return []
    by_tp: dict[int, dict[int, list[tuple[float, float]]]] = {}
    shape: dict[int, tuple[int, int, int, int]] = {}
    for i, row in enumerate(rows, start=2):
        nh, nkv, h, inter, m, tp = (_integer(row.get(c), pf.path, c, i) for c in SHAPE_COLUMNS)
        gemm = sum(_number(row.get(time_column(op)), pf.path, time_column(op), i, positive=True) for op in GemmOp)
        elem = sum(n * _number(row.get(time_column(op)), pf.path, time_column(op), i, positive=True)
                   for op, n in ELEMENTWISE_OPS.items())
        by_tp.setdefault(tp, {}).setdefault(m, []).append((gemm * 1e-3, elem * 1e-3))
        shape[tp] = (nh, nkv, h, inter)
    out = []
    for tp, by_tokens in sorted(by_tp.items()):
        tokens = np.array(sorted(by_tokens), dtype=float)
        g = np.array([np.median([x[0] for x in by_tokens[int(t)]]) for t in tokens])
        e = np.array([np.median([x[1] for x in by_tokens[int(t)]]) for t in tokens])
        nh, nkv, h, inter = shape[tp]
        out.append(LayerOps(pf.gpu.name, pf.model, tp, pf.gpu.memory_bandwidth_gbs * 1e9, tokens, g, e,
                            float(elementwise_bytes(h, nh, nkv, inter, tp, DTYPE_BYTES))))
    return out


@dataclass(frozen=True)
class OpTerms:
    """What the step-time model's non-GEMM terms were fitted on, and the fits."""

    layer_ops: tuple[LayerOps, ...]
    attention_profiles: tuple[AttentionProfile, ...]
    elementwise: dict[str, ElementwiseFit]  # GPU type -> its element-wise fit (all its models and TP degrees)
    attention: AttentionFit | None  # fitted on every attention profile given (the shipped one: A100, Llama-2-7B)


def read_op_terms(files: Sequence[ProfileFile], fit_gpus: Sequence[str] | None = None) -> OpTerms:
    """Read element-wise and attention kernels next to `files` and fit them (GPU types in `fit_gpus`, or all)."""
    layer_ops = tuple(x for f in files for x in read_layer_ops(f))
    attn = tuple(read_attention(f) for f in attention_files(files))
    keep = set(fit_gpus) if fit_gpus is not None else {x.gpu for x in layer_ops} | {a.gpu for a in attn}
    elementwise: dict[str, ElementwiseFit] = {}
    for gpu in sorted({x.gpu for x in layer_ops} & keep):
        ops = [x for x in layer_ops if x.gpu == gpu]
        elementwise[gpu] = fit_elementwise(
            np.concatenate([x.tokens for x in ops]),
            np.concatenate([np.full(x.tokens.size, x.elementwise_bytes_per_token) for x in ops]),
            np.concatenate([np.full(x.tokens.size, x.bandwidth_bytes_s) for x in ops]),
            np.concatenate([x.elementwise_s for x in ops]))
    fit = None
    used = [a for a in attn if a.gpu in keep]
    if used:
        a = used[0]  # one (GPU, model) profile ships; several would be concatenated per GPU the same way
        fit = fit_attention(a.prefill_chunk, a.prefill_done, a.prefill_s, a.decode_batch, a.decode_kv, a.decode_s,
                            hidden=a.hidden, kv_bytes_per_token=a.kv_bytes_per_token, peak_flops_s=a.peak_flops_s,
                            bandwidth_bytes_s=a.bandwidth_bytes_s)
    return OpTerms(layer_ops, attn, elementwise, fit)
