"""The model engine: a Llama-family causal LM in plain PyTorch behind the `base.EngineProtocol` seam.

    load_engine(model, ...)   -> LlamaEngine   (HF directory, .gguf file, or "smollm2"; see `loader`)
    Generator(engine)                          (continuous batching, sampling, stop strings; see `generate`)
    kv_to_tensors / kv_from_tensors            (a KVCache as a plain dict of tensors and back)
    parallel                                   (tensor/pipeline parallel layout and drivers)

`Generator` and `RequestOutput` are imported on first use (they pull in the workers' sampling code).
"""

from typing import TYPE_CHECKING, Any

from thunderserve.runtime.engine.base import (
    DecodeInput,
    EngineProtocol,
    KVBuffer,
    KVCache,
    PrefillResult,
    SamplingParams,
)
from thunderserve.runtime.engine.config import EngineConfig, LlamaSpec
from thunderserve.runtime.engine.engine import LlamaEngine, StepItem
from thunderserve.runtime.engine.kvutil import kv_from_tensors, kv_to_tensors
from thunderserve.runtime.engine.loader import load_engine, resolve_model_dir

if TYPE_CHECKING:
    from thunderserve.runtime.engine.generate import Generator, RequestOutput

__all__ = ["DecodeInput", "EngineConfig", "EngineProtocol", "Generator", "KVBuffer", "KVCache", "LlamaEngine",
           "LlamaSpec", "PrefillResult", "RequestOutput", "SamplingParams", "StepItem", "kv_from_tensors",
           "kv_to_tensors", "load_engine", "resolve_model_dir"]


def __getattr__(name: str) -> Any:
    if name in ("Generator", "RequestOutput"):
        from thunderserve.runtime.engine import generate

        return getattr(generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
