"""Builders shared by the simulator tests: toy clusters/plans and fixed request streams."""

from __future__ import annotations

from typing import Any

import numpy as np

from builders import TOY_GPU, make_cluster, make_model, make_plan
from thunderserve.spec.workload import WorkloadSpec

MODEL = make_model()
SMALL_GPU: dict[str, Any] = {**TOY_GPU, "name": "SMALL", "memory_gb": 1.33}  # ~3,067 KV tokens with MODEL


def two_node_cluster(gbps: float = 10.0, small: bool = False):  # type: ignore[no-untyped-def]
    kind = "SMALL" if small else "TOY"
    return make_cluster((("a", "TOY", 2), ("b", kind, 2)), default_gbps=gbps, gpu_types=(TOY_GPU, SMALL_GPU))


def disagg_plan(compression: str = "none"):  # type: ignore[no-untyped-def]
    return make_plan([("p0", "prefill", [["a:0"]], [0, 2]), ("d0", "decode", [["b:0"]], [0, 2])],
                     entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}}, compression=compression)


def colocated_plan(gpu: str = "a:0"):  # type: ignore[no-untyped-def]
    return make_plan([("c0", "colocated", [[gpu]], [0, 2])], entry={"c0": 1.0})


def requests(arrivals: list[float], prompt: int, output: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = len(arrivals)
    return np.asarray(arrivals, float), np.full(n, prompt, np.int64), np.full(n, output, np.int64)


def constant_workload(prompt: int, output: int, n: int = 100) -> WorkloadSpec:
    return WorkloadSpec("const", np.arange(n, dtype=float), np.full(n, prompt, np.int64),
                        np.full(n, output, np.int64))
