"""Cost model: pure latency, memory and transfer estimates (no I/O). See `perf` for the formulas."""

from thunderserve.costmodel.comm import Compression, allreduce_time_s, compression_ratio, send_time_s
from thunderserve.costmodel.kv import kv_bytes, kv_seconds_per_token, kv_transfer_time_s
from thunderserve.costmodel.perf import GroupPerf, StagePerf, group_perf, stage_perf

__all__ = [
    "Compression", "GroupPerf", "StagePerf", "allreduce_time_s", "compression_ratio", "group_perf",
    "kv_bytes", "kv_seconds_per_token", "kv_transfer_time_s", "send_time_s", "stage_perf",
]
