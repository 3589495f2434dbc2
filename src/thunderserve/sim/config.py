"""Simulator knobs (frozen): batching limits, colocated scheduling policy, measurement window."""

from __future__ import annotations

from dataclasses import dataclass, field

from thunderserve.policy.batching import BatchingConfig
from thunderserve.policy.routing import Dispatch
from thunderserve.policy.step import ColocatedPolicy

# Measurement protocol of max_rate_at_slo and compare (see sim.metrics): Poisson arrivals for
# DEFAULT_DURATION_S seconds (and at least DEFAULT_MIN_REQUESTS requests: the duration is stretched at low
# rates), the first DEFAULT_WARMUP_S seconds of arrivals excluded from metrics, every request run to
# completion (the tail drains without new arrivals).
DEFAULT_DURATION_S = 600.0
DEFAULT_WARMUP_S = 60.0
DEFAULT_MIN_REQUESTS = 1500
DEFAULT_RATE_TOLERANCE = 0.02  # bisection stops when (hi - lo) / hi < this


@dataclass(frozen=True)
class SimConfig:
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    colocated_policy: ColocatedPolicy = ColocatedPolicy.CHUNKED
    ideal_kv_links: bool = False  # KV transfers take no time (what DistServe's placement search assumes)
    # how requests pick an entry group and KV caches a decode group: the plan's shares in weighted round-robin,
    # or least outstanding requests per unit of share (load-aware; see policy.routing)
    dispatch: Dispatch = Dispatch.WEIGHTED
    warmup_s: float = DEFAULT_WARMUP_S  # arrivals before this are simulated but not measured


@dataclass(frozen=True)
class LoadConfig:
    """How a rate becomes a request stream for max_rate_at_slo and friends."""

    duration_s: float = DEFAULT_DURATION_S
    min_requests: int = DEFAULT_MIN_REQUESTS
    seed: int = 0
    rate_tolerance: float = DEFAULT_RATE_TOLERANCE
