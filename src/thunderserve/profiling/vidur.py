"""Reader for Vidur-format per-operation GPU profiles (`<gpu>/<org>/<model>/mlp.csv`).

Each row of an `mlp.csv` holds measured latencies in milliseconds (`time_stats.<op>.median`) of one transformer
layer's operations at one `num_tokens` (rows of the activations) and `num_tensor_parallel_workers`, plus the model
shape (`n_head`, `n_kv_head`, `n_embd`, `n_expanded_embd`, `use_gated_mlp`). The four linear operations are GEMMs
of shape [num_tokens x in] x [in x out] on each TP shard:

    attn_pre_proj  (QKV):      in = n_embd,             out = (n_head + 2 n_kv_head) head_dim / tp
    attn_post_proj (O):        in = n_head head_dim / tp, out = n_embd
    mlp_up_proj    (gate+up):  in = n_embd,             out = (2 if gated else 1) n_expanded_embd / tp
    mlp_down_proj  (down):     in = n_expanded_embd / tp, out = n_embd

Folder names map to catalog GPU types and models as Vidur names them (both maps overridable). Every value is
checked: a missing column, a non-number, NaN or a non-positive time is a `SpecError` naming the file and column.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path

import numpy as np

from thunderserve.errors import SpecError
from thunderserve.spec.gpu import GpuSpec, lookup_gpu
from thunderserve.spec.model import model_catalog

DTYPE_BYTES = 2  # Vidur profiles fp16 kernels
PROFILE_FILE = "mlp.csv"

DEFAULT_GPU_MAP: dict[str, str] = {"a100": "A100-80GB", "a40": "A40", "h100": "H100-SXM"}
DEFAULT_MODEL_MAP: dict[str, str] = {
    "Llama-2-7b-hf": "llama-2-7b",
    "Llama-2-70b-hf": "llama-2-70b",
    "CodeLlama-34b-Instruct-hf": "codellama-34b",
}


class GemmOp(StrEnum):
    """The linear operations of a layer, by their Vidur column names."""

    QKV = "attn_pre_proj"
    O = "attn_post_proj"  # noqa: E741 - the attention output projection
    UP = "mlp_up_proj"
    DOWN = "mlp_down_proj"


# Non-GEMM kernels of one layer and how many times each runs per layer (two residual adds).
ELEMENTWISE_OPS: dict[str, int] = {
    "input_layernorm": 1, "attn_rope": 1, "post_attention_layernorm": 1, "mlp_act": 1, "add": 2,
}
SHAPE_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "num_tokens", "num_tensor_parallel_workers")


def time_column(op: str) -> str:
    return f"time_stats.{op}.median"


@dataclass(frozen=True)
class ProfileFile:
    """One discovered `mlp.csv` and what its folders map to."""

    path: Path
    gpu_folder: str  # as on disk (e.g. "a100")
    gpu: GpuSpec  # the catalog type it maps to (datasheet peak and bandwidth)
    model_folder: str  # as on disk (e.g. "Llama-2-7b-hf")
    model: str  # catalog model name, or the folder name when unmapped


@dataclass(frozen=True)
class GemmSamples:
    """Measured GEMMs in columnar form (one entry per gpu x model x op x num_tokens x tp; medians of duplicates)."""

    gpu: np.ndarray  # catalog GPU type name (str)
    model: np.ndarray  # model name (str)
    op: np.ndarray  # GemmOp value (str)
    num_tokens: np.ndarray  # rows M of the GEMM
    tp: np.ndarray  # tensor-parallel workers
    k: np.ndarray  # inner dimension per shard
    n: np.ndarray  # output columns per shard
    peak_flops_s: np.ndarray  # datasheet FP16 FLOP/s of the GPU
    bandwidth_bytes_s: np.ndarray  # datasheet memory bandwidth of the GPU, bytes/s
    measured_s: np.ndarray  # median latency, seconds

    def __len__(self) -> int:
        return int(self.measured_s.shape[0])

    @property
    def flops(self) -> np.ndarray:
        return 2.0 * self.num_tokens * self.k * self.n

    @property
    def mem_bytes(self) -> np.ndarray:
        """Roofline traffic: read activations and weights, write outputs (fp16)."""
        return DTYPE_BYTES * (self.num_tokens * self.k + self.k * self.n + self.num_tokens * self.n)

    def select(self, mask: np.ndarray) -> GemmSamples:
        return GemmSamples(**{f: getattr(self, f)[mask] for f in self.__dataclass_fields__})

    def gpus(self) -> list[str]:
        return sorted(set(self.gpu.tolist()))


@dataclass(frozen=True)
class ProfileData:
    """Everything read from a profile tree: GEMM samples plus per-layer fixed costs of the non-GEMM kernels."""

    gemms: GemmSamples
    elementwise_fixed_us: dict[str, float]  # GPU type -> median per-layer non-GEMM time at the fewest tokens, us
    files: tuple[ProfileFile, ...]


def packaged_profiles_dir() -> Path:
    """The Vidur profiles shipped inside the package (see data/profiles/ATTRIBUTION.md)."""
    return Path(str(resources.files("thunderserve").joinpath("data/profiles/vidur")))


def parse_map(text: str | None, field: str) -> dict[str, str]:
    """Parse 'a=B,c=D' (a CLI override map); a malformed entry is a SpecError naming the option."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SpecError(f"expected folder=name pairs separated by commas, got '{item}'", field=field)
        out[key.strip()] = value.strip()
    return out


def _lookup(mapping: Mapping[str, str], key: str) -> str | None:
    lowered = {k.lower(): v for k, v in mapping.items()}
    return lowered.get(key.lower())


def discover(root: Path, gpu_map: Mapping[str, str] | None = None,
             model_map: Mapping[str, str] | None = None, gpus: Sequence[str] | None = None) -> list[ProfileFile]:
    """Find every `mlp.csv` under `root` and map its folders to catalog GPU types and models.

    `root` is the tree holding `<gpu>/...` folders, or one `<gpu>` folder itself. `gpus` keeps only the listed
    GPU folders or catalog names (case-insensitive).
    """
    if not root.is_dir():
        raise SpecError("no such profile directory", source=str(root))
    gmap = {**DEFAULT_GPU_MAP, **(gpu_map or {})}
    mmap = {**DEFAULT_MODEL_MAP, **(model_map or {})}
    keep = {g.lower() for g in gpus} if gpus else None
    found: list[ProfileFile] = []
    for path in sorted(root.rglob(PROFILE_FILE)):
        rel = path.relative_to(root).parts
        gpu_folder = root.name if _lookup(gmap, root.name) is not None else (rel[0] if len(rel) > 1 else root.name)
        gpu_name = _lookup(gmap, gpu_folder) or gpu_folder
        if keep is not None and gpu_folder.lower() not in keep and gpu_name.lower() not in keep:
            continue
        spec = lookup_gpu(gpu_name, source=str(path), field="GPU folder (map it with --gpu-map folder=TYPE)")
        model_folder = path.parent.name
        found.append(ProfileFile(path, gpu_folder, spec, model_folder, _lookup(mmap, model_folder) or model_folder))
    if not found:
        what = f" for GPUs {', '.join(gpus)}" if gpus else ""
        raise SpecError(f"no {PROFILE_FILE} files found{what}", source=str(root))
    return found


def _number(raw: str | None, path: Path, column: str, row: int, *, positive: bool) -> float:
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        raise SpecError(f"row {row}: not a number ('{raw}')", source=str(path), field=column) from None
    if not math.isfinite(value):
        raise SpecError(f"row {row}: not a finite number ('{raw}')", source=str(path), field=column)
    if positive and value <= 0:
        raise SpecError(f"row {row}: must be positive, got {raw}", source=str(path), field=column)
    return value


def _integer(raw: str | None, path: Path, column: str, row: int) -> int:
    value = _number(raw, path, column, row, positive=True)
    if value != int(value):
        raise SpecError(f"row {row}: must be a whole number, got {raw}", source=str(path), field=column)
    return int(value)


def _read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except OSError as exc:
        raise SpecError(f"cannot read file ({exc.strerror})", source=str(path)) from None
    except (csv.Error, UnicodeDecodeError) as exc:
        raise SpecError(f"not a CSV file ({exc})", source=str(path)) from None
    if not header:
        raise SpecError("empty file (expected a Vidur mlp.csv header)", source=str(path))
    if not rows:
        raise SpecError("no data rows", source=str(path))
    required = [time_column(op) for op in GemmOp] + list(SHAPE_COLUMNS)
    for column in required:
        if column not in header:
            raise SpecError("missing column (not a Vidur mlp.csv profile?)", source=str(path), field=column)
    return header, rows


def _check_model(pf: ProfileFile, shape: tuple[int, int, int, int]) -> None:
    catalog = model_catalog()
    if pf.model not in catalog:
        return
    m = catalog[pf.model]
    expected = {"n_head": m.num_heads, "n_kv_head": m.num_kv_heads, "n_embd": m.hidden_size,
                "n_expanded_embd": m.intermediate_size}
    for (column, want), got in zip(expected.items(), shape, strict=True):
        if want != got:
            raise SpecError(f"{got} does not match model '{pf.model}' ({want}); fix --model-map",
                            source=str(pf.path), field=column)


def read_file(pf: ProfileFile) -> tuple[dict[tuple[str, int, int, int, int], list[float]], list[float]]:
    """Validated GEMM latencies keyed by (op, M, tp, K, N), and per-layer non-GEMM times at the fewest tokens."""
    header, rows = _read_rows(pf.path)
    gemms: dict[tuple[str, int, int, int, int], list[float]] = {}
    elementwise_cols = [time_column(op) for op in ELEMENTWISE_OPS]
    has_elementwise = all(c in header for c in elementwise_cols)
    by_tokens: dict[int, list[float]] = {}
    for i, row in enumerate(rows, start=2):  # row numbers as a spreadsheet shows them (header is row 1)
        nh, nkv, h, inter, m, tp = (_integer(row.get(c), pf.path, c, i) for c in SHAPE_COLUMNS)
        _check_model(pf, (nh, nkv, h, inter))
        if h % nh:
            raise SpecError(f"row {i}: n_embd {h} is not a multiple of n_head {nh}", source=str(pf.path),
                            field="n_embd")
        gated = str(row.get("use_gated_mlp", "True")).strip().lower() not in ("false", "0", "")
        hd = h // nh
        shapes = {
            GemmOp.QKV: (h, (nh + 2 * nkv) * hd / tp),
            GemmOp.O: (nh * hd / tp, h),
            GemmOp.UP: (h, (2 if gated else 1) * inter / tp),
            GemmOp.DOWN: (inter / tp, h),
        }
        for op, (k, n) in shapes.items():
            ms = _number(row.get(time_column(op)), pf.path, time_column(op), i, positive=True)
            gemms.setdefault((op.value, m, tp, int(k), int(n)), []).append(ms * 1e-3)
        if has_elementwise:
            total = sum(count * _number(row.get(time_column(op)), pf.path, time_column(op), i, positive=True)
                        for op, count in ELEMENTWISE_OPS.items())
            by_tokens.setdefault(m, []).append(total * 1e3)  # ms -> us
    fixed = by_tokens[min(by_tokens)] if by_tokens else []
    return gemms, fixed


def load_profiles(files: Sequence[ProfileFile],
                  on_file: Callable[[ProfileFile], None] | None = None) -> ProfileData:
    """Read and validate every file; duplicate measurements of one shape are reduced to their median.

    `on_file` is called after each file (progress reporting).
    """
    cols: dict[str, list[object]] = {f: [] for f in GemmSamples.__dataclass_fields__}
    fixed_by_gpu: dict[str, list[float]] = {}
    for pf in files:
        gemms, fixed = read_file(pf)
        if fixed:
            fixed_by_gpu.setdefault(pf.gpu.name, []).extend(fixed)
        for (op, m, tp, k, n), times in sorted(gemms.items()):
            for f, v in (("gpu", pf.gpu.name), ("model", pf.model), ("op", op), ("num_tokens", m), ("tp", tp),
                         ("k", k), ("n", n), ("peak_flops_s", pf.gpu.fp16_tflops * 1e12),
                         ("bandwidth_bytes_s", pf.gpu.memory_bandwidth_gbs * 1e9),
                         ("measured_s", float(np.median(times)))):
                cols[f].append(v)
        if on_file is not None:
            on_file(pf)
    arrays = {f: np.asarray(v, dtype=object if f in ("gpu", "model", "op") else float) for f, v in cols.items()}
    samples = GemmSamples(**arrays)
    elementwise = {g: float(np.median(v)) for g, v in sorted(fixed_by_gpu.items())}
    return ProfileData(samples, elementwise, tuple(files))


def load_profile_dir(root: Path, gpu_map: Mapping[str, str] | None = None,
                     model_map: Mapping[str, str] | None = None, gpus: Sequence[str] | None = None) -> ProfileData:
    """discover() + load_profiles() in one call."""
    return load_profiles(discover(root, gpu_map, model_map, gpus))
