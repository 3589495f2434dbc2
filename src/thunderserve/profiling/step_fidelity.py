"""Step-level fidelity: whole transformer-layer steps (prefill, decode, mixed) predicted by the step-time model
against the same steps composed from measured kernels, the way Vidur composes them.

A measured step of one layer is the sum of Vidur's measured kernels for it: the four GEMMs and the element-wise
kernels at the step's token count (`mlp.csv`, interpolated between profiled sizes) plus the attention kernels
(`attention.csv`): prefill attention of the chunk, decode attention of the running batch, both in a mixed step.
Steps come from the attention profile's own points: each prefill row (chunk c after `done` tokens) is a prefill
step, each decode row (batch b at context kv) a decode step, and every prefill row paired with decode batches of
MIXED_DECODE_BATCHES at the profile's middle context a mixed (chunked-prefill) step of b + c tokens.

The prediction is `StagePerf.step_time_s` of a one-layer stage (what the simulator and the estimate call) on the
calibrated GPU type. Attention is profiled on one GPU type only (A100, Llama-2-7B); on other types the steps are
the same shapes with attention left out of both sides (reported as `"attention": "not profiled"`), so their
errors cover the GEMM and element-wise terms carried by datasheet, not attention.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from thunderserve.costmodel.calibration import Calibration, calibrated_gpu
from thunderserve.costmodel.fit import error_stats
from thunderserve.costmodel.perf import StagePerf, stage_perf
from thunderserve.profiling.vidur_ops import AttentionProfile, LayerOps
from thunderserve.spec.cluster import ClusterSpec, NodeSpec, resolve_cluster
from thunderserve.spec.gpu import lookup_gpu
from thunderserve.spec.model import model_catalog

MIXED_DECODE_BATCHES = (4, 16, 32, 64, 96)

# Vidur's published whole-model step times for Llama-2-7B on one A100 at TP1 (issue 11), milliseconds:
# (kind, decodes, decode context per sequence, chunk tokens, tokens already prefilled before the chunk, Vidur ms)
VIDUR_PUBLISHED_STEPS: tuple[tuple[str, int, int, int, int, float], ...] = (
    ("prefill", 0, 0, 1024, 0, 76.9),
    ("decode", 1, 1088, 0, 0, 9.7), ("decode", 32, 1088, 0, 0, 20.2), ("decode", 96, 1088, 0, 0, 40.9),
    ("mixed", 20, 1088, 492, 512, 44.1), ("mixed", 40, 1088, 472, 512, 50.2),
)


def _one_gpu_stage(gpu_name: str, model_name: str, calib: Calibration, num_layers: int, *, first: bool = False,
                   last: bool = False) -> StagePerf:
    gpu = calibrated_gpu(lookup_gpu(gpu_name), calib)
    cluster = resolve_cluster(ClusterSpec(name="fidelity", gpu_types=(gpu,),
                                          nodes=(NodeSpec(name="n", gpu=gpu.name, count=1),)), "fidelity")
    return stage_perf(model_catalog()[model_name], cluster.gpus, num_layers, cluster, first=first, last=last)


def _without_attention(stage: StagePerf) -> StagePerf:
    return replace(stage, attn_prefill_flops_s=float("inf"), attn_decode_bytes_s=float("inf"),
                   attn_prefill_overhead_s=0.0, attn_decode_overhead_s=0.0)


def _cases(attn: AttentionProfile) -> dict[str, tuple[np.ndarray, ...]]:
    """(decodes, context per decode, chunk, done, measured attention s) per step kind."""
    zp = np.zeros_like(attn.prefill_chunk)
    zd = np.zeros_like(attn.decode_batch)
    mid_kv = float(np.median(attn.decode_kv))
    at_mid = attn.decode_kv == mid_kv
    mixed: list[tuple[float, float, float, float, float]] = []
    for b in MIXED_DECODE_BATCHES:
        hit = at_mid & (attn.decode_batch == b)
        if not hit.any():
            continue
        dec_s = float(np.median(attn.decode_s[hit]))
        for c, d, s in zip(attn.prefill_chunk, attn.prefill_done, attn.prefill_s, strict=True):
            mixed.append((b, mid_kv, c, d, s + dec_s))
    m = np.array(mixed, dtype=float).reshape(-1, 5)
    return {"prefill": (zp, zp, attn.prefill_chunk, attn.prefill_done, attn.prefill_s),
            "decode": (attn.decode_batch, attn.decode_kv, zd, zd, attn.decode_s),
            "mixed": (m[:, 0], m[:, 1], m[:, 2], m[:, 3], m[:, 4])}


def _stats(pred: np.ndarray, meas: np.ndarray) -> dict[str, float | int]:
    st = error_stats(pred, meas)
    return {"num_points": st.num_points, "median_relative_error": round(st.median_relative_error, 4),
            "p90_relative_error": round(st.p90_relative_error, 4)}


def step_fidelity(calib: Calibration, layer_ops: tuple[LayerOps, ...],
                  attention: tuple[AttentionProfile, ...]) -> dict[str, Any]:
    """Per GPU type and step kind, the relative error of predicted one-layer step times (module docstring)."""
    out: dict[str, Any] = {}
    catalog = model_catalog()
    for attn in attention:
        cases = _cases(attn)
        for ops in layer_ops:
            if ops.model != attn.model or ops.tp != 1 or attn.model not in catalog:
                continue
            measured_attention = ops.gpu == attn.gpu
            stage = _one_gpu_stage(ops.gpu, ops.model, calib, 1)
            if not measured_attention:
                stage = _without_attention(stage)
            entry: dict[str, Any] = {"attention": "measured" if measured_attention else "not profiled"}
            for kind, (b, kv, c, d, attn_s) in cases.items():
                gemm_s, elem_s = ops.at(b + c)
                meas = gemm_s + elem_s + (attn_s if measured_attention else 0.0)
                pred = np.asarray(stage.step_time_s(b, b * kv, c, c * c + 2.0 * c * d, np.zeros_like(b)))
                entry[kind] = _stats(pred - stage.step_overhead_s, meas)
            out[ops.gpu] = entry
    return out


def vidur_published_steps(calib: Calibration, gpu_name: str = "A100-80GB") -> list[dict[str, Any]]:
    """The whole-model Llama-2-7B steps Vidur published, predicted on `gpu_name` (A100: the published GPU)."""
    stage = _one_gpu_stage(gpu_name, "llama-2-7b", calib, model_catalog()["llama-2-7b"].num_layers, first=True,
                           last=True)
    rows = []
    for kind, b, kv, c, d, vidur_ms in VIDUR_PUBLISHED_STEPS:
        t = float(stage.step_time_s(float(b), float(b * kv), float(c), float(c * c + 2 * c * d),
                                    float(b + (1 if c else 0))))
        rows.append({"kind": kind, "decodes": b, "context_tokens": kv, "chunk_tokens": c, "prefilled_before": d,
                     "vidur_ms": vidur_ms, "predicted_ms": round(t * 1e3, 2), "ratio": round(t * 1e3 / vidur_ms, 3)})
    return rows
