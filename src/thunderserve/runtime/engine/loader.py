"""`load_engine`: resolve a model reference (HF directory, .gguf file, or "smollm2") and build a `LlamaEngine`.

GGUF files are converted once into the model cache (see `gguf_convert`), so every load reads safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from thunderserve.runtime.engine.config import EngineConfig, LlamaSpec
from thunderserve.runtime.engine.engine import LlamaEngine
from thunderserve.runtime.engine.gguf_convert import SMOLLM2_CACHE_NAME, cached_hf_dir, smollm2_gguf_path
from thunderserve.runtime.engine.model import AllReduce
from thunderserve.runtime.engine.text import TextCodec
from thunderserve.runtime.engine.weights import SafetensorsDir, ShardPlan, load_stage_weights, read_hf_config

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_model_dir(model: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The HuggingFace directory for a model reference, converting a GGUF into the cache when needed."""
    ref = str(model)
    if ref.lower() in SMOLLM2_ALIASES:
        return cached_hf_dir(smollm2_gguf_path(), SMOLLM2_CACHE_NAME, cache_dir)
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return cached_hf_dir(path, None, cache_dir)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"model '{ref}' is neither a HuggingFace directory, a .gguf file nor one of "
                            f"{', '.join(SMOLLM2_ALIASES)}")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.").lower()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}' (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def tp_all_reduce(group: object | None = None) -> AllReduce:
    """Sum a tensor over the tensor-parallel process group (torch.distributed; gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=group)  # type: ignore[arg-type]
        return t

    return reduce


def load_engine(model: str | Path, *, device: str = "cpu", dtype: torch.dtype | str | None = None,
                cache_dir: str | Path | None = None, first_layer: int = 0, end_layer: int | None = None,
                tp_rank: int = 0, tp_size: int = 1, tp_group: object | None = None,
                all_reduce: AllReduce | None = None, row_multiple: int = 4) -> LlamaEngine:
    """Load `model` (HF dir, .gguf, or "smollm2") for one pipeline stage [first_layer, end_layer) and TP shard.

    With tp_size > 1 the caller has initialised torch.distributed; `tp_group` (default: the world) holds the
    tp_size ranks of this stage, in tp_rank order. `all_reduce` replaces the torch.distributed sum (a seam:
    tests run TP shards as threads with an in-process reduce).
    """
    path = resolve_model_dir(model, cache_dir)
    spec = LlamaSpec.from_hf_config(read_hf_config(path))
    config = EngineConfig(device=device, dtype=resolve_dtype(dtype), first_layer=first_layer,
                          end_layer=spec.num_layers if end_layer is None else end_layer, tp_rank=tp_rank,
                          tp_size=tp_size, row_multiple=row_multiple)
    if config.end_layer is not None and config.end_layer > spec.num_layers:
        raise ValueError(f"end_layer {config.end_layer} exceeds the model's {spec.num_layers} layers")
    plan = ShardPlan(first_layer=first_layer, end_layer=spec.num_layers if end_layer is None else end_layer,
                     tp_rank=tp_rank, tp_size=tp_size)
    shape = plan.shape(spec)
    weights = load_stage_weights(SafetensorsDir(path), spec, plan, torch.device(device), config.resolved_dtype())
    text = TextCodec(path) if TextCodec.available(path) else None
    reduce = all_reduce or (tp_all_reduce(tp_group) if tp_size > 1 else None)
    return LlamaEngine(spec, weights, shape, config, text=text, all_reduce=reduce)
