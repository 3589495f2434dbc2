"""Discrete-event serving simulator: replays a workload against a Plan in virtual time (see `replay`)."""

from thunderserve.sim.config import LoadConfig, SimConfig
from thunderserve.sim.metrics import (
    RateSearch,
    SimMetrics,
    compute_metrics,
    latency_deadline_factor,
    latency_deadline_scale,
    max_rate_at_slo,
    poisson_stream,
    simulate_at_rate,
    slo_attainment,
    trace_stream,
)
from thunderserve.sim.replay import SimResult, simulate
from thunderserve.sim.verify import rescore, rescorer

__all__ = [
    "LoadConfig", "RateSearch", "SimConfig", "SimMetrics", "SimResult", "compute_metrics",
    "latency_deadline_factor", "latency_deadline_scale", "max_rate_at_slo", "poisson_stream", "rescore", "rescorer", "simulate",
    "simulate_at_rate", "slo_attainment", "trace_stream",
]
