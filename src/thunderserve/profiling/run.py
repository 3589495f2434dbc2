"""`thunderserve profile` as a library call: load the local engine, measure the device and the engine, return the
profile (the I/O shell around `engine_profile` and `microbench`)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from thunderserve.costmodel.comm import Compression
from thunderserve.errors import SpecError
from thunderserve.profiling.engine_profile import (
    KvCodec,
    ProfileGrid,
    Timer,
    profile_engine,
    profile_engine_shared,
    profile_kv,
)
from thunderserve.profiling.kv_link import measure_transfer_s
from thunderserve.profiling.microbench import cpu_name, measure_peaks, memory_gb
from thunderserve.profiling.neighbours import Neighbours
from thunderserve.profiling.schema import DeviceInfo, EngineProfile, Measurement
from thunderserve.runtime.engine.base import EngineProtocol
from thunderserve.spec.model import ModelSpec, load_model

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m")


def resolve_device(name: str) -> torch.device:
    if name not in ("cpu", "cuda"):
        raise SpecError(f"unknown device '{name}' (cpu or cuda)", field="--device")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("CUDA is not available on this machine", field="--device")
    return torch.device(name)


def model_spec_for(model_ref: str, dtype: torch.dtype) -> ModelSpec:
    """The model's shape, with dtype_bytes set to what the engine computes in."""
    spec = load_model("smollm2-135m" if model_ref.lower() in SMOLLM2_ALIASES else model_ref)
    return spec.model_copy(update={"dtype_bytes": torch.empty(0, dtype=dtype).element_size()})


def load_local_engine(model_ref: str, device: torch.device) -> EngineProtocol:
    """The runtime's engine (`thunderserve.runtime.engine.load_engine(model, device=...)`)."""
    try:
        mod = importlib.import_module("thunderserve.runtime.engine")
        loader: Callable[..., Any] = mod.load_engine
    except (ImportError, AttributeError):
        raise SpecError("the local engine (thunderserve.runtime.engine.load_engine) is not available in this build",
                        field="--model") from None
    return loader(model_ref, device=str(device))  # type: ignore[no-any-return]


def engine_dtype(engine: EngineProtocol) -> torch.dtype:
    """The dtype the engine computes in, read off the KV cache of a one-token prefill."""
    with torch.inference_mode():
        return engine.prefill([[1]])[0].kv.keys.dtype


def kv_codecs() -> dict[str, KvCodec]:
    """The runtime's KV codecs, one per compression level, when the runtime provides the quantiser."""
    try:
        importlib.import_module("thunderserve.runtime.kv.quantize")
        from thunderserve.runtime.workers.codec import QuantizeKvCodec
    except ImportError:
        return {}
    return {c.value: QuantizeKvCodec(c) for c in Compression}


def device_info(device: torch.device, dtype: torch.dtype, gpu_type: str | None,
                on_step: Callable[[str], None], peak_sizes: Sequence[int] = (512, 1024, 2048)) -> DeviceInfo:
    peaks = measure_peaks(device, dtype, matmul_sizes=peak_sizes)
    on_step("device peaks")
    if device.type == "cuda":
        name, threads, default_type = torch.cuda.get_device_name(device), 1, "CUDA-LOCAL"
    else:
        name, threads, default_type = cpu_name(), torch.get_num_threads(), "CPU"
    return DeviceInfo(kind="cuda" if device.type == "cuda" else "cpu", name=name, gpu_type=gpu_type or default_type,
                      threads=threads, torch_version=torch.__version__, dtype=str(dtype).removeprefix("torch."),
                      peak_tflops=peaks.peak_tflops, memory_bandwidth_gbs=peaks.memory_bandwidth_gbs,
                      memory_gb=memory_gb(device))


def run_profile(model_ref: str, device_name: str, grid: ProfileGrid, *, gpu_type: str | None = None,
                on_step: Callable[[str], None] | None = None, engine: EngineProtocol | None = None,
                peak_sizes: Sequence[int] = (512, 1024, 2048), model_spec: ModelSpec | None = None,
                threads: int | None = None, neighbours: int = 0) -> EngineProfile:
    """Load the engine, measure device peaks in its dtype, then its prefill/decode grid and KV codec costs.

    `engine` + `model_spec` profile an already-built engine (e.g. the runtime's fake); `threads` sets torch's
    intra-op threads first (match what a serving worker uses: `serve --cpu-threads`). `neighbours` > 0 (CPU
    only) also measures the grid with that many busy neighbour processes running `model_ref` at the same thread
    count (the deployment's other workers on this machine; see `profiling.neighbours`).
    """
    step = on_step or (lambda _label: None)
    device = resolve_device(device_name)
    if threads is not None:
        if threads < 1:
            raise SpecError("must be at least 1", field="--threads")
        torch.set_num_threads(threads)
    if neighbours < 0:
        raise SpecError("must be at least 0", field="--neighbours")
    if neighbours and device.type != "cpu":
        raise SpecError("busy neighbours model workers sharing this machine's CPU; use --device cpu",
                        field="--neighbours")
    if engine is None:
        engine = load_local_engine(model_ref, device)
    dtype = engine_dtype(engine)
    spec = (model_spec or model_spec_for(model_ref, dtype)).model_copy(
        update={"dtype_bytes": torch.empty(0, dtype=dtype).element_size()})
    step("engine loaded")
    info = device_info(device, dtype, gpu_type, step, peak_sizes)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timer = Timer(sync=sync, cpu_clock=time.process_time if device.type == "cpu" else None)
    shared: list[Measurement] = []
    with torch.inference_mode():
        if neighbours:
            with Neighbours(model_ref, neighbours, torch.get_num_threads()) as busy:
                step(f"{neighbours} neighbour(s) loaded")
                ms, shared = profile_engine_shared(engine, grid, spec.vocab_size, busy, timer=timer, on_step=step)
        else:
            ms = profile_engine(engine, grid, spec.vocab_size, timer=timer, on_step=step)
        codecs = kv_codecs()
        kv = profile_kv(engine, codecs, grid, spec.vocab_size, timer=timer, on_step=step,
                        transfer=partial(measure_transfer_s, warmup=grid.warmup, repeats=grid.repeats)) \
            if codecs else []
    notes = () if codecs else ("no KV quantiser available (thunderserve.runtime.kv.quantize); KV cost not measured",)
    return EngineProfile(device=info, model=spec, engine=model_ref, warmup=grid.warmup, repeats=grid.repeats,
                         measurements=tuple(ms), kv=tuple(kv), notes=notes, neighbours=neighbours,
                         shared_measurements=tuple(shared))
