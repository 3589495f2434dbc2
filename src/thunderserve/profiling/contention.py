"""How busy a local deployment's workers keep each other: the weights for `EngineProfile.samples(neighbour_busy=)`.

A 1-prefill + 1-decode deployment on one machine (the demo plan) runs two worker processes that share the
CPU. A profile taken with a busy neighbour (`profiling.neighbours`) gives each forward pass shape alone and
contended; what a pass costs in the deployment depends on how often the *other* worker computes meanwhile.
From a simulated run of that deployment:

* the prefill worker computes during [first token - its prefill time, first token] of every request (P),
* the decode worker during [first token, finish] of every request with more than one output token (D),

so a prefill pass runs next to a busy decode worker |P & D| / |P| of the time, and a decode step next to a
busy prefill worker |P & D| / |D| of the time. Fitting the device to the blended latencies and simulating
again converges in a few rounds (`benchmarks/bench_fidelity_serve.py` iterates it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from thunderserve.costmodel.fit import PassKind

if TYPE_CHECKING:
    from thunderserve.costmodel.perf import GroupPerf
    from thunderserve.sim.replay import SimResult

Intervals = list[tuple[float, float]]


def merge_intervals(starts: Sequence[float], ends: Sequence[float]) -> Intervals:
    """The union of intervals [starts[i], ends[i]] as sorted, disjoint intervals (NaN ones dropped)."""
    out: Intervals = []
    pairs = sorted((float(a), float(b)) for a, b in zip(starts, ends, strict=True) if a == a and b == b and b > a)
    for a, b in pairs:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def total_length(xs: Intervals) -> float:
    return sum(b - a for a, b in xs)


def overlap_length(xs: Intervals, ys: Intervals) -> float:
    """Total length of the intersection of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        total += max(0.0, min(xs[i][1], ys[j][1]) - max(xs[i][0], ys[j][0]))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def _busy(result: SimResult, prefill_perf: GroupPerf) -> tuple[Intervals, Intervals]:
    """(prefill worker busy intervals P, decode worker busy intervals D) of a simulated run."""
    prefill_s = np.array([prefill_perf.prefill_latency_s([int(p)]) for p in result.prompt_tokens])
    first = result.first_token_s
    busy_p = merge_intervals((first - prefill_s).tolist(), first.tolist())
    multi = result.output_tokens > 1
    return busy_p, merge_intervals(first[multi].tolist(), result.finish_s[multi].tolist())


def worker_utilisation(result: SimResult, prefill_perf: GroupPerf) -> dict[str, float]:
    """Fraction of the run (first arrival to last finish) each worker computes: |P| / span, |D| / span."""
    busy_p, busy_d = _busy(result, prefill_perf)
    span = float(np.nanmax(result.finish_s) - np.min(result.arrival_s)) if result.num_requests else 0.0
    if span <= 0:
        return {"prefill": 0.0, "decode": 0.0}
    return {"prefill": total_length(busy_p) / span, "decode": total_length(busy_d) / span}


def neighbour_busy(result: SimResult, prefill_perf: GroupPerf) -> dict[PassKind, float]:
    """Fraction of its prefill (decode) time the prefill (decode) worker shares the machine with a busy other
    worker, in a simulated disaggregated run; `prefill_perf` is the prefill group's cost model."""
    busy_p, busy_d = _busy(result, prefill_perf)
    both = overlap_length(busy_p, busy_d)
    p, d = total_length(busy_p), total_length(busy_d)
    return {PassKind.PREFILL: both / p if p > 0 else 0.0, PassKind.DECODE: both / d if d > 0 else 0.0}
