"""GPU types: datasheet facts plus the cost model's efficiency factors (the knobs calibration fits)."""

from __future__ import annotations

from enum import StrEnum
from functools import cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field

from thunderserve.errors import SpecError


class LinkKind(StrEnum):
    PCIE = "pcie"
    NVLINK = "nvlink"


CODEC_BYTES_MOVED = 2.5  # bytes read + written per fp16 KV byte by a quantise or dequantise kernel


class GpuSpec(BaseModel):
    """One GPU type. Units are in the field names; efficiencies are fractions of peak."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    memory_gb: float = Field(gt=0)  # device memory, GB (1e9 bytes)
    fp16_tflops: float = Field(gt=0)  # dense FP16 tensor throughput, TFLOP/s
    memory_bandwidth_gbs: float = Field(gt=0)  # device memory bandwidth, GB/s
    intra_node_link: LinkKind = LinkKind.PCIE
    intra_node_gbs: float = Field(gt=0)  # GPU-to-GPU bandwidth inside a node, GB/s
    price_usd_per_hour: float = Field(ge=0)  # default on-demand price per GPU-hour
    compute_efficiency: float = Field(default=0.55, gt=0, le=1)
    memory_efficiency: float = Field(default=0.75, gt=0, le=1)
    layer_overhead_us: float = Field(default=20.0, ge=0)  # fixed cost per layer per forward pass
    # batch tokens at which compute efficiency reaches half of compute_efficiency (0 = constant efficiency);
    # see costmodel.perf.roofline_time_s and costmodel.calibration
    compute_saturation_tokens: float = Field(default=0.0, ge=0)
    # Per-operation terms of the step-time model (`costmodel.perf.StagePerf.step_time_s`); fractions of datasheet
    # peak so that one fit carries to other GPU types. Defaults: the fit of Vidur's A100 attention profile.
    elementwise_memory_efficiency: float = Field(default=0.55, gt=0, le=1)  # norms, rotary, activation, adds
    attention_prefill_efficiency: float = Field(default=0.38, gt=0, le=1)  # of peak FLOP/s, prefill attention
    attention_pad_tokens: float = Field(default=1260.0, ge=0)  # extra key positions per query (tile waste)
    attention_prefill_overhead_us: float = Field(default=4.0, ge=0)  # per layer, once per step with prefills
    attention_decode_memory_efficiency: float = Field(default=0.90, gt=0, le=1)  # of bandwidth, KV reads
    attention_decode_overhead_us: float = Field(default=16.7, ge=0)  # per layer, once per step with decodes
    step_overhead_us: float = Field(default=0.0, ge=0)  # per forward pass (CPU scheduling, sampling)
    # KV codec (int8/int4 quantise or dequantise) throughput over uncompressed KV bytes, GB/s; None: estimated
    # from memory bandwidth (`codec_bytes_s`); measured types (the CPU via `profile`/`bench-kv`) set it
    codec_gbs: float | None = Field(default=None, gt=0)

    @property
    def codec_bytes_s(self) -> float:
        """Quantise (or dequantise) throughput over fp16 KV bytes. Without a measured `codec_gbs`, a
        bandwidth-bound estimate: the codec is an element-wise kernel that moves CODEC_BYTES_MOVED bytes per fp16
        byte (reads it, writes codes and scales, plus a pass for the per-group min/max), at the element-wise
        kernels' fitted bandwidth efficiency."""
        if self.codec_gbs is not None:
            return self.codec_gbs * 1e9
        return self.memory_bandwidth_gbs * 1e9 * self.elementwise_memory_efficiency / CODEC_BYTES_MOVED

    @property
    def key(self) -> str:
        return self.name.lower()


@cache
def gpu_catalog() -> dict[str, GpuSpec]:
    """The shipped catalog, keyed by lower-case name (names match case-insensitively)."""
    text = resources.files("thunderserve.spec").joinpath("catalog/gpus.yaml").read_text()
    raw = yaml.safe_load(text)
    return {g["name"].lower(): GpuSpec.model_validate(g) for g in raw["gpus"]}


def lookup_gpu(name: str, extra: dict[str, GpuSpec] | None = None, *, source: str | None = None,
               field: str | None = None) -> GpuSpec:
    """Find a GPU type by name (case-insensitive), preferring `extra` (cluster-local) entries."""
    key = name.lower()
    if extra and key in extra:
        return extra[key]
    catalog = gpu_catalog()
    if key in catalog:
        return catalog[key]
    known = ", ".join(g.name for g in catalog.values())
    raise SpecError(f"unknown GPU type '{name}' (known: {known})", source=source, field=field)
