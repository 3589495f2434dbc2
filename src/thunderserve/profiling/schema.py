"""The engine profile file (`thunderserve profile -o profile.json`), format "thunderserve-profile/1".

It records the device (CPU model and threads or GPU name, the dtype the engine ran in, and the device's peak
FLOP/s and memory bandwidth as measured by a matmul / copy microbenchmark), the model shape as the engine ran it,
and median latencies of whole-model prefill passes (batch size x prompt tokens) and decode steps (batch size x
context tokens), plus KV quantise/dequantise costs when the runtime provides a quantiser.
`calibrate --profile` fits a pseudo GPU type for the device from it (see `costmodel.calibration`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thunderserve.costmodel.fit import PassKind, StageSample
from thunderserve.errors import SpecError
from thunderserve.spec._load import first_error
from thunderserve.spec.gpu import GpuSpec
from thunderserve.spec.model import ModelSpec

FORMAT: Literal["thunderserve-profile/1"] = "thunderserve-profile/1"

_Pos = Field(gt=0, allow_inf_nan=False)


class DeviceInfo(BaseModel):
    """The measured device and its microbenchmarked peaks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["cpu", "cuda"]
    name: str  # CPU model name or CUDA device name
    gpu_type: str = Field(min_length=1)  # name of the pseudo GPU type calibration fits (e.g. "CPU")
    threads: int = Field(gt=0)  # torch intra-op threads (CPU) or 1
    torch_version: str
    dtype: str  # engine compute dtype, e.g. "float32"
    peak_tflops: float = _Pos  # measured dense matmul throughput in `dtype`, TFLOP/s
    memory_bandwidth_gbs: float = _Pos  # measured copy bandwidth (read + write), GB/s
    memory_gb: float = _Pos  # device memory (RAM for a CPU), GB


class Measurement(BaseModel):
    """Median latency of one whole-model forward pass shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    phase: PassKind
    batch_size: int = Field(gt=0)
    tokens: int = Field(gt=0)  # prompt tokens per sequence (prefill) or context tokens per sequence (decode)
    latency_s: float = _Pos  # median over repetitions
    samples_s: tuple[float, ...] = ()  # every timed repetition

    def sample(self) -> StageSample:
        return StageSample(self.phase, self.batch_size, self.tokens, self.latency_s)


class KvMeasurement(BaseModel):
    """Cost of compressing one request's KV cache for transfer and restoring it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    tokens: int = Field(gt=0)
    raw_bytes: int = Field(gt=0)
    encoded_bytes: int = Field(gt=0)
    encode_s: float = _Pos  # median
    decode_s: float = _Pos  # median


class EngineProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["thunderserve-profile/1"] = FORMAT
    device: DeviceInfo
    model: ModelSpec  # shape as run (dtype_bytes = the engine's compute dtype)
    engine: str  # what was profiled (model path or name)
    warmup: int = Field(ge=0)
    repeats: int = Field(gt=0)
    measurements: tuple[Measurement, ...] = Field(min_length=1)
    kv: tuple[KvMeasurement, ...] = ()
    notes: tuple[str, ...] = ()

    def samples(self) -> list[StageSample]:
        return [m.sample() for m in self.measurements]

    def device_spec(self) -> GpuSpec:
        """The device as a GpuSpec (measured peaks; factors default until calibrated)."""
        d = self.device
        return GpuSpec(name=d.gpu_type, memory_gb=d.memory_gb, fp16_tflops=d.peak_tflops,
                       memory_bandwidth_gbs=d.memory_bandwidth_gbs, intra_node_gbs=d.memory_bandwidth_gbs,
                       price_usd_per_hour=0.0)


def parse_profile(text: str, source: str) -> EngineProfile:
    if not text.strip():
        raise SpecError("empty file (expected a thunderserve profile JSON)", source=source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"malformed JSON at line {exc.lineno}: {exc.msg}", source=source) from None
    if not isinstance(data, dict):
        raise SpecError("expected a JSON object (a thunderserve profile)", source=source)
    if data.get("format") != FORMAT:
        raise SpecError(f"not a thunderserve profile (format must be '{FORMAT}')", source=source, field="format")
    try:
        return EngineProfile.model_validate(data)
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise SpecError(msg, source=source, field=field) from None


def load_profile(path: Path) -> EngineProfile:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("file not found", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read file ({exc})", source=str(path)) from None
    return parse_profile(text, str(path))


def dump_profile(profile: EngineProfile) -> str:
    return json.dumps(profile.model_dump(mode="json"), indent=2) + "\n"
