"""Fitting the cost model's efficiency factors to measured latencies (pure: arrays in, factors out).

Two levels, one roofline (`costmodel.perf.roofline_time_s`):

* GEMM level (Vidur per-operation profiles): one linear op of M tokens, FLOPs = 2·M·K·N,
  bytes = 2·(M·K + K·N + M·N), predicted
      t = max(FLOPs·(M + m0)/M / (peak·eff_c), bytes / (bandwidth·eff_m)) + op_overhead
  i.e. compute efficiency saturates with the token count, eff_c(M) = eff_c·M/(M + m0), because small-M GEMMs
  leave tensor-core tiles partly empty. The four parameters (eff_c, eff_m, m0, op_overhead) are dimensionless or
  in tokens/us, so one set fitted on some GPU types predicts another from its datasheet peak and bandwidth.
* Stage level (the local engine's prefill/decode latencies): the same parameters fitted through `StagePerf` itself
  (per-layer overhead instead of per-op), so the simulator and planner use exactly the fitted function.

Fits are least squares on log(predicted / measured) with a soft-L1 loss (robust to the few wave-quantisation
outliers of real GEMM kernels), deterministic (fixed start, no randomness).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
from scipy.optimize import least_squares

from thunderserve.costmodel.perf import StagePerf, stage_perf
from thunderserve.spec.cluster import ClusterSpec, NodeSpec, resolve_cluster
from thunderserve.spec.gpu import GpuSpec
from thunderserve.spec.model import ModelSpec

LOSS = "soft_l1"
LOSS_SCALE = 0.1  # log-error beyond which residuals count linearly rather than quadratically (~10%)
MAX_SATURATION_TOKENS = 4096.0
MAX_OVERHEAD_US = 1e5


@dataclass(frozen=True)
class RooflineFactors:
    """Fitted parameters of the roofline (efficiencies are fractions of datasheet peak)."""

    compute_efficiency: float  # fraction of peak FLOP/s reached by large GEMMs
    memory_efficiency: float  # fraction of peak bandwidth reached when streaming weights
    compute_saturation_tokens: float  # tokens at which compute efficiency is half of compute_efficiency
    overhead_us: float  # fixed cost per op (GEMM level) or per layer (stage level), microseconds


@dataclass(frozen=True)
class ErrorStats:
    """Relative error |predicted/measured - 1| summarised."""

    num_points: int
    median_relative_error: float
    p90_relative_error: float
    mean_relative_error: float


@dataclass(frozen=True)
class FitResult:
    factors: RooflineFactors
    errors: ErrorStats


def relative_errors(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(predicted, dtype=float) / np.asarray(measured, dtype=float) - 1.0)


def error_stats(predicted: np.ndarray, measured: np.ndarray) -> ErrorStats:
    err = relative_errors(predicted, measured)
    if err.size == 0:
        return ErrorStats(0, float("nan"), float("nan"), float("nan"))
    return ErrorStats(int(err.size), float(np.median(err)), float(np.percentile(err, 90)), float(err.mean()))


def gemm_time_s(flops: np.ndarray, mem_bytes: np.ndarray, tokens: np.ndarray, peak_flops_s: np.ndarray,
                bandwidth_bytes_s: np.ndarray, f: RooflineFactors) -> np.ndarray:
    """Vectorised `perf.roofline_time_s` (same formula, pinned equal by a test) plus the per-op overhead."""
    compute = flops / (peak_flops_s * f.compute_efficiency)
    if f.compute_saturation_tokens > 0:
        compute = compute * (tokens + f.compute_saturation_tokens) / tokens
    memory = mem_bytes / (bandwidth_bytes_s * f.memory_efficiency)
    return np.maximum(compute, memory) + f.overhead_us * 1e-6


@dataclass(frozen=True)
class GemmArrays:
    """The inputs of a GEMM-level fit (one entry per measured op and size)."""

    flops: np.ndarray
    mem_bytes: np.ndarray
    tokens: np.ndarray
    peak_flops_s: np.ndarray
    bandwidth_bytes_s: np.ndarray
    measured_s: np.ndarray

    def predict(self, f: RooflineFactors) -> np.ndarray:
        return gemm_time_s(self.flops, self.mem_bytes, self.tokens, self.peak_flops_s, self.bandwidth_bytes_s, f)


_X0 = np.array([0.6, 0.7, 32.0, 5.0])
_LOWER = np.array([1e-3, 1e-3, 0.0, 0.0])
_UPPER = np.array([1.0, 1.0, MAX_SATURATION_TOKENS, MAX_OVERHEAD_US])


def _solve(residual, x0: np.ndarray, free: np.ndarray,  # type: ignore[no-untyped-def]
           starts: Sequence[np.ndarray] = ()) -> np.ndarray:
    """Least squares over the `free` entries of the 4-parameter vector (the rest stay at x0).

    The max() in the roofline makes the landscape piecewise, so extra `starts` (full vectors) are tried too and
    the lowest-cost solution wins (deterministic: fixed starts, ties to the earliest).
    """
    lower, upper = _LOWER[free], _UPPER[free]
    best_x, best_cost = x0.copy(), np.inf
    for start_x in (x0, *starts):
        def wrapped(z: np.ndarray, base: np.ndarray = start_x) -> np.ndarray:
            x = base.copy()
            x[free] = z
            return residual(x)

        start = np.clip(start_x[free], lower + 1e-9, upper - 1e-9)
        sol = least_squares(wrapped, start, bounds=(lower, upper), loss=LOSS, f_scale=LOSS_SCALE, x_scale="jac")
        if sol.cost < best_cost - 1e-15:
            best_cost = sol.cost
            best_x = start_x.copy()
            best_x[free] = sol.x
    return best_x


def _factors(x: np.ndarray) -> RooflineFactors:
    return RooflineFactors(float(x[0]), float(x[1]), float(x[2]), float(x[3]))


def fit_gemm(data: GemmArrays, *, saturation_tokens: float | None = None) -> FitResult:
    """Fit eff_c, eff_m, m0 and the per-op overhead to GEMM latencies; `saturation_tokens` pins m0."""
    if data.measured_s.size < 4:
        raise ValueError("need at least 4 measured GEMMs to fit 4 parameters")
    log_measured = np.log(data.measured_s)

    def residual(x: np.ndarray) -> np.ndarray:
        return np.log(data.predict(_factors(x))) - log_measured

    x0 = _X0.copy()
    free = np.array([True, True, True, True])
    if saturation_tokens is not None:
        x0[2] = saturation_tokens
        free[2] = False
    f = _factors(_solve(residual, x0, free))
    return FitResult(f, error_stats(data.predict(f), data.measured_s))


class PassKind(StrEnum):
    """Which kind of forward pass a measurement is."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class StageSample:
    """One measured forward pass of a whole model on one device."""

    phase: PassKind
    batch_size: int  # sequences in the batch
    tokens: int  # prompt tokens per sequence (prefill) or context tokens per sequence (decode)
    measured_s: float


def unit_gpu(spec: GpuSpec) -> GpuSpec:
    """The same device with all efficiency factors neutral (1, 1, no saturation, no overhead)."""
    return spec.model_copy(update={"compute_efficiency": 1.0, "memory_efficiency": 1.0,
                                   "compute_saturation_tokens": 0.0, "layer_overhead_us": 0.0,
                                   **ENGINE_OP_FACTORS, "attention_prefill_efficiency": 1.0,
                                   "attention_decode_memory_efficiency": 1.0})


# A whole-model engine profile cannot separate attention from the linear layers: its fit ties attention to the
# fitted compute (prefill) and memory (decode) efficiencies and leaves the op-level terms neutral.
ENGINE_OP_FACTORS: dict[str, float] = {"attention_pad_tokens": 0.0, "attention_prefill_overhead_us": 0.0,
                                       "attention_decode_overhead_us": 0.0, "elementwise_memory_efficiency": 1.0,
                                       "step_overhead_us": 0.0}


def _single_device_stage(model: ModelSpec, gpu: GpuSpec) -> StagePerf:
    spec = ClusterSpec(name="profile", gpu_types=(gpu,), nodes=(NodeSpec(name="local", gpu=gpu.name, count=1),))
    cluster = resolve_cluster(spec, "profile")
    return stage_perf(model, cluster.gpus, model.num_layers, cluster, first=True, last=True)


def stage_predict_s(base: StagePerf, samples: Sequence[StageSample], f: RooflineFactors) -> np.ndarray:
    """Predicted latency of each sample by `StagePerf` with factors `f` applied (per-layer overhead)."""
    stage = replace(base, flops_s=base.flops_s * f.compute_efficiency,
                    mem_bytes_s=base.mem_bytes_s * f.memory_efficiency,
                    overhead_s=base.num_layers * f.overhead_us * 1e-6,
                    compute_saturation_tokens=f.compute_saturation_tokens,
                    attn_prefill_flops_s=base.attn_prefill_flops_s * f.compute_efficiency,
                    attn_decode_bytes_s=base.attn_decode_bytes_s * f.memory_efficiency)
    out = np.empty(len(samples))
    for i, s in enumerate(samples):
        if s.phase is PassKind.PREFILL:
            out[i] = stage.prefill_time_s(float(s.batch_size * s.tokens), float(s.batch_size * s.tokens ** 2),
                                          float(s.batch_size))
        else:
            out[i] = stage.decode_time_s(float(s.batch_size), float(s.batch_size * s.tokens))
    return out


def fit_stage(model: ModelSpec, gpu: GpuSpec, samples: Sequence[StageSample]) -> tuple[GpuSpec, FitResult]:
    """Fit a device's factors to whole-model prefill/decode latencies through `StagePerf`.

    Returns the device's GpuSpec carrying the fitted factors (layer_overhead_us = fitted per-layer overhead).
    """
    if len(samples) < 4:
        raise ValueError("need at least 4 measured forward passes to fit 4 parameters")
    base = _single_device_stage(model, unit_gpu(gpu))
    measured = np.array([s.measured_s for s in samples])

    def residual(x: np.ndarray) -> np.ndarray:
        return np.log(stage_predict_s(base, samples, _factors(x))) - np.log(measured)

    # starts spread over the plausible range: per-layer overhead from 0 to most of the fastest pass, saturation
    # from none to a few hundred tokens, efficiencies low and high (a few dozen cheap solves on few points)
    per_layer_us = float(measured.min()) / model.num_layers * 1e6
    starts = [np.array([e, e, sat, frac * per_layer_us])
              for e in (0.2, 0.7) for sat in (1.0, 64.0) for frac in (0.05, 0.4, 0.9)]
    f = _factors(_solve(residual, starts[0], np.array([True, True, True, True]), starts[1:]))
    fitted = gpu.model_copy(update={"compute_efficiency": f.compute_efficiency,
                                    "memory_efficiency": f.memory_efficiency,
                                    "compute_saturation_tokens": f.compute_saturation_tokens,
                                    "layer_overhead_us": f.overhead_us, **ENGINE_OP_FACTORS,
                                    "attention_prefill_efficiency": f.compute_efficiency,
                                    "attention_decode_memory_efficiency": f.memory_efficiency})
    return fitted, FitResult(f, error_stats(stage_predict_s(base, samples, f), measured))


def predict_stage_s(model: ModelSpec, gpu: GpuSpec, samples: Sequence[StageSample]) -> np.ndarray:
    """Predicted latency of each sample with the factors `gpu` already carries (for fidelity reports)."""
    base = _single_device_stage(model, unit_gpu(gpu))
    f = RooflineFactors(gpu.compute_efficiency, gpu.memory_efficiency, gpu.compute_saturation_tokens,
                        gpu.layer_overhead_us)
    return stage_predict_s(base, samples, f)
