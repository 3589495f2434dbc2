"""Fidelity: the calibrated cost model's predictions against measured latencies, per operation and size.

For a GPU type the calibration measured, its own factors predict; for any other type the calibration's shared
model predicts from the catalog's datasheet peak and bandwidth ("shared"); without either, the catalog factors
("catalog"). Summaries are relative errors |predicted/measured - 1|: overall, and by GPU, model, op, GPU x model and
GPU x token-count class (decode-sized GEMMs behave differently from prefill-sized ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from thunderserve.costmodel.calibration import Calibration
from thunderserve.costmodel.fit import RooflineFactors, StageSample, error_stats, gemm_time_s, predict_stage_s
from thunderserve.profiling.vidur import GemmSamples
from thunderserve.spec.gpu import GpuSpec, lookup_gpu
from thunderserve.spec.model import ModelSpec


@dataclass(frozen=True)
class Fidelity:
    """Predicted vs measured latencies of GEMMs (columnar), with where each GPU's factors came from."""

    samples: GemmSamples
    predicted_s: np.ndarray
    basis: dict[str, str]  # GPU type -> "fitted" | "shared" | "catalog"


def _factors(name: str, calib: Calibration) -> tuple[RooflineFactors, str]:
    own = calib.gpu(name)
    if own is not None and own.op_overhead_us is not None:
        return own.factors(), "fitted"
    if calib.shared is not None:
        return calib.shared.factors(), "shared"
    spec: GpuSpec = lookup_gpu(name)
    return RooflineFactors(spec.compute_efficiency, spec.memory_efficiency, spec.compute_saturation_tokens,
                           0.0), "catalog"


def gemm_fidelity(calib: Calibration, samples: GemmSamples) -> Fidelity:
    """Predict every measured GEMM with the calibration."""
    predicted = np.empty(len(samples))
    basis: dict[str, str] = {}
    for name in samples.gpus():
        mask = samples.gpu == name
        f, basis[name] = _factors(name, calib)
        s = samples.select(mask)
        predicted[mask] = gemm_time_s(s.flops, s.mem_bytes, s.num_tokens, s.peak_flops_s, s.bandwidth_bytes_s, f)
    return Fidelity(samples, predicted, basis)


def _stats(pred: np.ndarray, meas: np.ndarray) -> dict[str, float | int]:
    st = error_stats(pred, meas)
    return {"num_points": st.num_points, "median_relative_error": round(st.median_relative_error, 4),
            "p90_relative_error": round(st.p90_relative_error, 4),
            "mean_relative_error": round(st.mean_relative_error, 4)}


def _group(fid: Fidelity, keys: np.ndarray) -> dict[str, dict[str, float | int]]:
    meas = fid.samples.measured_s
    return {k: _stats(fid.predicted_s[keys == k], meas[keys == k]) for k in sorted(set(keys.tolist()))}


def summarize(fid: Fidelity) -> dict[str, Any]:
    """The fidelity JSON: overall errors at the top level, then breakdowns."""
    s = fid.samples
    out: dict[str, Any] = _stats(fid.predicted_s, s.measured_s)
    by_gpu = _group(fid, s.gpu)
    for name, entry in by_gpu.items():
        entry["basis"] = fid.basis[name]  # type: ignore[assignment]
    out["by_gpu"] = by_gpu
    out["by_model"] = _group(fid, s.model)
    out["by_op"] = _group(fid, s.op)
    pair = np.array([f"{g}/{m}" for g, m in zip(s.gpu.tolist(), s.model.tolist(), strict=True)], dtype=object)
    out["by_gpu_model"] = _group(fid, pair)
    bucket = np.array([_bucket(int(t)) for t in s.num_tokens], dtype=object)
    out["by_gpu_tokens"] = _group(fid, np.array([f"{g}/{b}" for g, b in zip(s.gpu.tolist(), bucket.tolist(),
                                                                             strict=True)], dtype=object))
    return out


TOKEN_BUCKETS = (1, 32, 128, 512, 2048)  # lower edges: decode-sized GEMMs up to long-prefill ones


def _bucket(tokens: int) -> str:
    """Size class of a GEMM by its token rows, e.g. 'tokens 0032-0127' (zero-padded so names sort by size)."""
    lo = max(b for b in TOKEN_BUCKETS if b <= tokens) if tokens >= 1 else 1
    nxt = [b for b in TOKEN_BUCKETS if b > lo]
    return f"tokens {lo:04d}-{nxt[0] - 1:04d}" if nxt else f"tokens {lo:04d}+"


def points(fid: Fidelity) -> list[dict[str, Any]]:
    """Every point (for --points / plots): gpu, model, op, tokens, tp, measured and predicted microseconds."""
    s = fid.samples
    return [{"gpu": g, "model": m, "op": o, "num_tokens": int(t), "tp": int(p),
             "measured_us": round(float(y) * 1e6, 3), "predicted_us": round(float(x) * 1e6, 3)}
            for g, m, o, t, p, y, x in zip(s.gpu.tolist(), s.model.tolist(), s.op.tolist(), s.num_tokens,
                                           s.tp, s.measured_s, fid.predicted_s, strict=True)]


def engine_fidelity(calib: Calibration, model: ModelSpec, device: GpuSpec,
                    samples: Sequence[StageSample]) -> dict[str, Any]:
    """Predicted vs measured whole-model latencies of an engine profile, by phase.

    The device's factors come from the calibration when it fitted this device, else from `device` as given.
    """
    own = calib.gpu(device.name)
    spec = own.spec if own is not None else device
    pred = predict_stage_s(model, spec, samples)
    meas = np.array([x.measured_s for x in samples])
    phases = np.array([x.phase.value for x in samples], dtype=object)
    out: dict[str, Any] = _stats(pred, meas)
    out["basis"] = "fitted" if own is not None else "as given"
    out["by_phase"] = {p: _stats(pred[phases == p], meas[phases == p]) for p in sorted(set(phases.tolist()))}
    out["points"] = [{"phase": x.phase.value, "batch_size": x.batch_size, "tokens": x.tokens,
                      "measured_ms": round(x.measured_s * 1e3, 4), "predicted_ms": round(float(p) * 1e3, 4)}
                     for x, p in zip(samples, pred, strict=True)]
    return out
