"""Builders for the scheduler tests: small heterogeneous clusters, a fixed synthetic workload, SLOs."""

from __future__ import annotations

from typing import Any

import numpy as np

from builders import TOY_GPU, make_cluster
from thunderserve.scheduler.context import PlanningContext
from thunderserve.spec import SloSpec, WorkloadSpec, load_model
from thunderserve.spec.cluster import Cluster

FAST_GPU: dict[str, Any] = {**TOY_GPU, "name": "FAST", "fp16_tflops": 400, "memory_bandwidth_gbs": 2000,
                            "memory_gb": 48}
SLOW_GPU: dict[str, Any] = {**TOY_GPU, "name": "SLOW", "fp16_tflops": 100, "memory_bandwidth_gbs": 500,
                            "memory_gb": 48}
TINY_GPU: dict[str, Any] = {**TOY_GPU, "name": "TINY", "memory_gb": 4}
GPU_TYPES = (TOY_GPU, FAST_GPU, SLOW_GPU, TINY_GPU)


def cluster(nodes: tuple[tuple[str, str, int], ...], default_gbps: float = 40.0, **network: Any) -> Cluster:
    return make_cluster(nodes, default_gbps=default_gbps, gpu_types=GPU_TYPES, **network)


def synthetic_workload(n: int = 400, seed: int = 0) -> WorkloadSpec:
    """Lognormal-ish prompts (~600 tokens) and outputs (~120 tokens), Poisson-ish arrival times."""
    rng = np.random.default_rng(seed)
    prompt = np.clip(rng.lognormal(6.2, 0.7, n), 16, 4000).astype(np.int64)
    output = np.clip(rng.lognormal(4.5, 0.8, n), 1, 1000).astype(np.int64)
    arrivals = np.cumsum(rng.exponential(0.5, n))
    return WorkloadSpec("synthetic", arrivals - arrivals[0], prompt, output)


SMALL_MODEL = "llama-2-7b"


def loose_slo() -> SloSpec:
    return SloSpec(ttft_ms=2000.0, tpot_ms=150.0, attainment_target=0.9)


def context(c: Cluster, model: str = SMALL_MODEL, **kw: Any) -> PlanningContext:
    return PlanningContext(c, load_model(model), synthetic_workload(), loose_slo(), **kw)
