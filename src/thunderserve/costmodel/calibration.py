"""Calibration: fitted efficiency factors per GPU type, a model for unseen types, and applying them to a cluster.

A `Calibration` (JSON, format "thunderserve-calibration/1") holds
* `gpus`: one entry per measured device type, carrying its full `GpuSpec` with fitted factors
  (compute_efficiency, memory_efficiency, compute_saturation_tokens, layer_overhead_us). Pseudo types such as
  the local CPU (from `thunderserve profile`) live here too, so a cluster YAML or `apply_calibration` can use them.
* `shared`: one parameter set fitted jointly across all GPU-profile types. Because every parameter is relative to
  the datasheet (fractions of peak, tokens, microseconds), it predicts a GPU type that was never measured from its
  catalog peak FLOP/s and bandwidth alone; `calibrated_gpu` uses it for any type not in `gpus`.

How the per-layer overhead is derived from op-level profiles: 4 GEMMs per layer each pay `op_overhead_us`, and
the non-GEMM kernels (two norms, rotary, activation, two residual adds) cost their measured time at the fewest
tokens (Vidur columns; their token-proportional part, ~5% of a layer at 4k tokens, is not modelled).

The built-in default (`data/calibration/default.json`) is the A100/A40 fit of the shipped Vidur profiles; the GPU
catalog (`spec/catalog/gpus.yaml`) carries the same numbers, so plain catalog lookups are already calibrated.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thunderserve.costmodel.fit import (
    ErrorStats,
    FitResult,
    GemmArrays,
    RooflineFactors,
    StageSample,
    fit_gemm,
    fit_stage,
)
from thunderserve.costmodel.opfit import AttentionFit, ElementwiseFit
from thunderserve.errors import SpecError
from thunderserve.spec._load import first_error
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.gpu import GpuSpec
from thunderserve.spec.model import ModelSpec

FORMAT: Literal["thunderserve-calibration/1"] = "thunderserve-calibration/1"
GEMMS_PER_LAYER = 4  # QKV, O, gate+up, down


class FitErrors(BaseModel):
    """Relative error of a fit on its own data (|predicted/measured - 1|)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_points: int = Field(ge=0)
    median_relative_error: float
    p90_relative_error: float
    mean_relative_error: float

    @classmethod
    def of(cls, stats: ErrorStats) -> FitErrors:
        return cls(num_points=stats.num_points, median_relative_error=round(stats.median_relative_error, 4),
                   p90_relative_error=round(stats.p90_relative_error, 4),
                   mean_relative_error=round(stats.mean_relative_error, 4))


class SharedFactors(BaseModel):
    """Factors fitted jointly across GPU types: the model for a GPU type that was never measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    compute_efficiency: float = Field(gt=0, le=1)
    memory_efficiency: float = Field(gt=0, le=1)
    compute_saturation_tokens: float = Field(ge=0)
    op_overhead_us: float = Field(ge=0)  # fixed cost per GEMM
    elementwise_overhead_us: float = Field(ge=0)  # non-GEMM kernels of one layer: fixed part
    # step-time terms beyond the GEMMs (None in files written before they existed: the catalog defaults apply)
    elementwise_memory_efficiency: float | None = Field(default=None, gt=0, le=1)
    attention_prefill_efficiency: float | None = Field(default=None, gt=0, le=1)
    attention_pad_tokens: float | None = Field(default=None, ge=0)
    attention_prefill_overhead_us: float | None = Field(default=None, ge=0)
    attention_decode_memory_efficiency: float | None = Field(default=None, gt=0, le=1)
    attention_decode_overhead_us: float | None = Field(default=None, ge=0)
    attention_errors: dict[str, FitErrors] | None = None  # "prefill" / "decode": the attention fit on its data
    fitted_on: tuple[str, ...]  # GPU types whose profiles were used
    errors: FitErrors

    @property
    def layer_overhead_us(self) -> float:
        return GEMMS_PER_LAYER * self.op_overhead_us + self.elementwise_overhead_us

    def factors(self) -> RooflineFactors:
        return RooflineFactors(self.compute_efficiency, self.memory_efficiency, self.compute_saturation_tokens,
                               self.op_overhead_us)

    def op_terms(self) -> dict[str, float]:
        """The step-time terms beyond GEMMs this fit carries, as GpuSpec fields (absent ones left out)."""
        return {k: v for k in OP_TERM_FIELDS if (v := getattr(self, k)) is not None}


OP_TERM_FIELDS = ("elementwise_memory_efficiency", "attention_prefill_efficiency", "attention_pad_tokens",
                  "attention_prefill_overhead_us", "attention_decode_memory_efficiency",
                  "attention_decode_overhead_us")


class GpuCalibration(BaseModel):
    """One measured device type: its spec with fitted factors and how well the fit matches its data."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: GpuSpec  # datasheet (or microbenchmarked) facts + fitted factors
    source: Literal["vidur", "engine-profile"]
    op_overhead_us: float | None = None  # per-GEMM fixed cost (op-level profiles only)
    errors: FitErrors

    def factors(self) -> RooflineFactors:
        """Op-level factors (engine profiles have no per-op overhead: 0)."""
        s = self.spec
        return RooflineFactors(s.compute_efficiency, s.memory_efficiency, s.compute_saturation_tokens,
                               self.op_overhead_us or 0.0)


class Calibration(BaseModel):
    """The calibration file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["thunderserve-calibration/1"] = FORMAT
    shared: SharedFactors | None = None  # absent when no GPU profiles were fitted
    gpus: tuple[GpuCalibration, ...] = ()
    sources: tuple[str, ...] = ()  # what was fitted (directories / files, as given)

    def gpu(self, name: str) -> GpuCalibration | None:
        key = name.lower()
        return next((g for g in self.gpus if g.spec.name.lower() == key), None)

    def gpu_types(self) -> dict[str, GpuSpec]:
        """Calibrated specs keyed by lower-case name (usable as `lookup_gpu(..., extra=...)`)."""
        return {g.spec.name.lower(): g.spec for g in self.gpus}

    def factors_for(self, spec: GpuSpec) -> RooflineFactors | None:
        """Op-level factors for a GPU type: its own fit, else the shared model, else None."""
        own = self.gpu(spec.name)
        if own is not None:
            return own.factors()
        return self.shared.factors() if self.shared is not None else None


def calibrated_gpu(spec: GpuSpec, calib: Calibration) -> GpuSpec:
    """`spec` with the calibration's factors: its own fit if measured, else the shared model; facts unchanged."""
    own = calib.gpu(spec.name)
    if own is not None:
        s = own.spec
        update = {"compute_efficiency": s.compute_efficiency, "memory_efficiency": s.memory_efficiency,
                  "compute_saturation_tokens": s.compute_saturation_tokens,
                  "layer_overhead_us": s.layer_overhead_us, **{k: getattr(s, k) for k in OP_TERM_FIELDS}}
    elif calib.shared is not None:
        sh = calib.shared
        update = {"compute_efficiency": sh.compute_efficiency, "memory_efficiency": sh.memory_efficiency,
                  "compute_saturation_tokens": sh.compute_saturation_tokens,
                  "layer_overhead_us": sh.layer_overhead_us, **sh.op_terms()}
    else:
        return spec
    return spec.model_copy(update={k: round(v, 4) for k, v in update.items()})


def apply_calibration(cluster: Cluster, calib: Calibration) -> Cluster:
    """A new resolved Cluster whose GPUs carry the calibrated factors (prices, links and the YAML spec unchanged)."""
    memo: dict[str, GpuSpec] = {}
    gpus = []
    for g in cluster.gpus:
        if g.spec.name not in memo:
            memo[g.spec.name] = calibrated_gpu(g.spec, calib)
        gpus.append(replace(g, spec=memo[g.spec.name]))
    return replace(cluster, gpus=tuple(gpus))


# ---- building a calibration from measurements -------------------------------------------------------------


class GemmSampleSet(Protocol):
    """What the fit needs from measured GEMMs (`profiling.vidur.GemmSamples`; costmodel stays free of I/O)."""

    @property
    def gpu(self) -> np.ndarray: ...  # GPU type name per sample
    @property
    def num_tokens(self) -> np.ndarray: ...
    @property
    def peak_flops_s(self) -> np.ndarray: ...
    @property
    def bandwidth_bytes_s(self) -> np.ndarray: ...
    @property
    def measured_s(self) -> np.ndarray: ...
    @property
    def flops(self) -> np.ndarray: ...
    @property
    def mem_bytes(self) -> np.ndarray: ...
    def select(self, mask: np.ndarray) -> GemmSampleSet: ...


def _gemm_arrays(samples: GemmSampleSet, mask: np.ndarray | None = None) -> GemmArrays:
    s = samples.select(mask) if mask is not None else samples
    return GemmArrays(s.flops, s.mem_bytes, s.num_tokens, s.peak_flops_s, s.bandwidth_bytes_s, s.measured_s)


def fit_gpu_profiles(samples: GemmSampleSet, specs: Mapping[str, GpuSpec],
                     elementwise_fixed_us: Mapping[str, float],
                     elementwise_fits: Mapping[str, ElementwiseFit] | None = None,
                     attention: AttentionFit | None = None) -> tuple[SharedFactors, list[GpuCalibration]]:
    """Fit the shared model over all GPU types in `samples`, then each type's own factors.

    Per type, compute and memory efficiency and the op overhead are refitted while m0 (a property of GEMM tiling,
    not of the chip) stays at the shared value: parameters are shared across GPU types where the data allow.
    With `elementwise_fits` (per type: fixed part + bandwidth efficiency of the element-wise kernels) the fixed
    part replaces `elementwise_fixed_us` in the layer overhead; `attention` (fitted on whatever attention profiles
    exist) applies to every type, as fractions of its datasheet peak.
    """
    gpu_names = sorted(set(samples.gpu.tolist()))
    shared_fit = fit_gemm(_gemm_arrays(samples))
    f = shared_fit.factors
    ew = {g: e for g, e in (elementwise_fits or {}).items() if g in gpu_names}
    if ew:
        elementwise_fixed_us = {g: e.fixed_us for g, e in ew.items()}
    elementwise = [elementwise_fixed_us[g] for g in gpu_names if g in elementwise_fixed_us]
    terms: dict[str, object] = {}
    if ew:
        terms["elementwise_memory_efficiency"] = round(float(np.mean([e.memory_efficiency for e in ew.values()])), 4)
    if attention is not None:
        a = attention
        terms |= {"attention_prefill_efficiency": round(a.prefill_efficiency, 4),
                  "attention_pad_tokens": round(a.pad_tokens, 1),
                  "attention_prefill_overhead_us": round(a.prefill_overhead_us, 2),
                  "attention_decode_memory_efficiency": round(a.decode_memory_efficiency, 4),
                  "attention_decode_overhead_us": round(a.decode_overhead_us, 2),
                  "attention_errors": {"prefill": FitErrors.of(a.prefill_errors),
                                       "decode": FitErrors.of(a.decode_errors)}}
    shared = SharedFactors(
        **terms,  # type: ignore[arg-type]
        compute_efficiency=round(f.compute_efficiency, 4), memory_efficiency=round(f.memory_efficiency, 4),
        compute_saturation_tokens=round(f.compute_saturation_tokens, 2), op_overhead_us=round(f.overhead_us, 3),
        elementwise_overhead_us=round(float(np.mean(elementwise)) if elementwise else 0.0, 2),
        fitted_on=tuple(gpu_names), errors=FitErrors.of(shared_fit.errors))
    op_terms = shared.op_terms()
    per_gpu: list[GpuCalibration] = []
    for name in gpu_names:
        mask = samples.gpu == name
        fit: FitResult = fit_gemm(_gemm_arrays(samples, mask), saturation_tokens=shared.compute_saturation_tokens)
        g = fit.factors
        layer_us = GEMMS_PER_LAYER * g.overhead_us + elementwise_fixed_us.get(name, shared.elementwise_overhead_us)
        spec = specs[name].model_copy(update={
            "compute_efficiency": round(g.compute_efficiency, 4), "memory_efficiency": round(g.memory_efficiency, 4),
            "compute_saturation_tokens": shared.compute_saturation_tokens, "layer_overhead_us": round(layer_us, 2),
            **op_terms, **({"elementwise_memory_efficiency": round(ew[name].memory_efficiency, 4)}
                           if name in ew else {})})
        per_gpu.append(GpuCalibration(spec=spec, source="vidur", op_overhead_us=round(g.overhead_us, 3),
                                      errors=FitErrors.of(fit.errors)))
    return shared, per_gpu


def fit_engine_profile(model: ModelSpec, device: GpuSpec, samples: Sequence[StageSample]) -> GpuCalibration:
    """Fit a pseudo GPU type (e.g. this machine's CPU) from whole-model prefill/decode latencies."""
    fitted, fit = fit_stage(model, device, samples)
    rounded = fitted.model_copy(update={
        "compute_efficiency": round(fitted.compute_efficiency, 4),
        "memory_efficiency": round(fitted.memory_efficiency, 4),
        "compute_saturation_tokens": round(fitted.compute_saturation_tokens, 2),
        "layer_overhead_us": round(fitted.layer_overhead_us, 2),
        "attention_prefill_efficiency": round(fitted.compute_efficiency, 4),
        "attention_decode_memory_efficiency": round(fitted.memory_efficiency, 4)})
    return GpuCalibration(spec=rounded, source="engine-profile", errors=FitErrors.of(fit.errors))


def merge(shared: SharedFactors | None, gpus: Sequence[GpuCalibration], sources: Sequence[str]) -> Calibration:
    names = [g.spec.name.lower() for g in gpus]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SpecError(f"GPU type fitted twice: {', '.join(dupes)} (give each type's data once)")
    return Calibration(shared=shared, gpus=tuple(sorted(gpus, key=lambda g: g.spec.name)), sources=tuple(sources))


# ---- files ----------------------------------------------------------------------------------------------------


def parse_calibration(text: str, source: str) -> Calibration:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"malformed JSON at line {exc.lineno}: {exc.msg}", source=source) from None
    if not isinstance(data, dict):
        raise SpecError("expected a JSON object (a calibration file)", source=source)
    if data.get("format") != FORMAT:
        raise SpecError(f"not a calibration file (format must be '{FORMAT}')", source=source, field="format")
    try:
        return Calibration.model_validate(data)
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise SpecError(msg, source=source, field=field) from None


def load_calibration(path: Path) -> Calibration:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("file not found", source=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read file ({exc.strerror})", source=str(path)) from None
    return parse_calibration(text, str(path))


def dump_calibration(calib: Calibration) -> str:
    return json.dumps(calib.model_dump(mode="json"), indent=2) + "\n"


@cache
def default_calibration() -> Calibration:
    """The shipped A100/A40 fit (see the module docstring)."""
    res = resources.files("thunderserve").joinpath("data/calibration/default.json")
    return parse_calibration(res.read_text(), "thunderserve/data/calibration/default.json")
