"""Cost model: pure latency, memory and transfer estimates (no I/O). See `perf` for the formulas.

The names below are loaded on first use (PEP 562), so `costmodel.comm` or `costmodel.reference` can be
imported without the whole model (the CLI's option parsing needs only those).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thunderserve.costmodel.comm import Compression, allreduce_time_s, compression_ratio, send_time_s
    from thunderserve.costmodel.kv import kv_bytes, kv_seconds_per_token, kv_transfer_time_s
    from thunderserve.costmodel.perf import GroupPerf, StagePerf, group_perf, stage_perf

_WHERE = {
    "Compression": "comm", "allreduce_time_s": "comm", "compression_ratio": "comm", "send_time_s": "comm",
    "kv_bytes": "kv", "kv_seconds_per_token": "kv", "kv_transfer_time_s": "kv", "GroupPerf": "perf",
    "StagePerf": "perf", "group_perf": "perf", "stage_perf": "perf",
}
__all__ = [
    "Compression", "GroupPerf", "StagePerf", "allreduce_time_s", "compression_ratio", "group_perf", "kv_bytes",
    "kv_seconds_per_token", "kv_transfer_time_s", "send_time_s", "stage_perf",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"thunderserve.costmodel.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'thunderserve.costmodel' has no attribute {name!r}")
