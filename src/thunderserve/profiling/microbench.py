"""Device facts for an engine profile: what the device is, and its achievable peak FLOP/s and memory bandwidth.

A CPU has no datasheet entry in the GPU catalog, so the roofline's "peak" figures for it are measured: a square
matmul in the engine's dtype (best of several sizes and repetitions, FLOPs = 2·n³) and a large tensor copy
(bytes = read + write). Efficiency factors fitted later are fractions of these measured peaks.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

Clock = Callable[[], float]


@dataclass(frozen=True)
class DevicePeaks:
    peak_tflops: float  # best matmul throughput measured, TFLOP/s
    memory_bandwidth_gbs: float  # best copy bandwidth measured (read + write bytes), GB/s
    matmul_sizes: tuple[int, ...]
    copy_bytes: int


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux), else whatever the platform reports."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def memory_gb(device: torch.device) -> float:
    """Device memory in GB: total RAM for a CPU, the GPU's memory otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 1.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int, clock: Clock) -> float:
    fn()  # warm-up (allocation, kernel selection)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        _sync(device)
        best = min(best, clock() - t0)
    return max(best, 1e-9)


def measure_peaks(device: torch.device, dtype: torch.dtype, *, matmul_sizes: Sequence[int] = (512, 1024, 2048),
                  copy_bytes: int = 256 * 2**20, repeats: int = 5, clock: Clock = time.perf_counter) -> DevicePeaks:
    """Best achieved matmul FLOP/s and copy bandwidth on `device` in `dtype`."""
    best_flops = 0.0
    with torch.inference_mode():
        for n in matmul_sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            t = _best_time(partial(torch.mm, a, b), device, repeats, clock)
            best_flops = max(best_flops, 2.0 * n**3 / t)
        elements = max(1, copy_bytes // 4)
        src = torch.ones(elements, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        t = _best_time(lambda: dst.copy_(src), device, repeats, clock)
    return DevicePeaks(peak_tflops=best_flops / 1e12, memory_bandwidth_gbs=2.0 * elements * 4 / t / 1e9,
                       matmul_sizes=tuple(matmul_sizes), copy_bytes=elements * 4)
