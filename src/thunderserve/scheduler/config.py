"""Knobs of the planner (`SchedulerConfig`) and what it returns (`PlanResult`)."""

from __future__ import annotations

from dataclasses import dataclass

from thunderserve.costmodel.comm import Compression
from thunderserve.plan.model import Phase, Plan

ALL_PHASES: tuple[Phase, ...] = (Phase.PREFILL, Phase.DECODE, Phase.COLOCATED)
# Default search budget in distinct states scored (routing LP solves), shared by the two search phases. Chosen
# so that paper-cloud-32 plans in 10-25 s on a loaded CI-class machine (README "Planner"); a count, so the
# same seed gives the same plan on any machine, whatever its load.
DEFAULT_MAX_EVALUATIONS = 400


@dataclass(frozen=True)
class SchedulerConfig:
    """Search knobs. Same config and seed => same plan on any machine: the search is bounded by work
    (`max_evaluations`, `max_iterations`, `patience`), not by time. `time_limit_s` is an optional wall-clock
    cap on top; a search it cuts short depends on the machine's speed (PlanResult.stopped_by says so)."""

    time_limit_s: float | None = None  # optional wall-clock cap of the whole search, s (None: no cap)
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS  # states scored by the tabu search at most (the budget)
    max_iterations: int = 2000  # tabu iterations at most
    patience: int = 200  # stop after this many iterations without a new best
    seed: int = 0  # seeds the move sampler (random.Random)
    kv_compression: Compression = Compression.INT4  # KV transfer compression (the paper's default)
    # Other KV levels the plan may end with (e.g. the less compressed ones the quality gate also allows): the
    # search runs at `kv_compression`, then the best state is finalised at each of these too and the level whose
    # plan the estimate rates highest is kept (ties: the less compressed). Not with `verify_top` > 1.
    kv_alternatives: tuple[Compression, ...] = ()
    phases: tuple[Phase, ...] = ALL_PHASES  # phases a group may take (baselines restrict this)
    max_pp: int = 4  # most pipeline stages in one group
    tabu_tenure: int = 12  # iterations a moved GPU / flipped group stays tabu
    neighbourhood_size: int = 16  # candidate moves sampled and scored per iteration
    time_budget_fraction_initial: float = 0.3  # share of the time cap (if any) the initial solution may use
    # After the search, re-score the best `verify_top` distinct candidates with the caller's rescorer (the
    # simulator) and keep the best simulated one; 0 or 1: keep the search's best (no rescorer needed).
    verify_top: int = 0


@dataclass(frozen=True)
class PlanResult:
    """The chosen plan and how the search got there."""

    plan: Plan
    max_rate_at_slo: float  # estimated largest request rate (req/s) meeting the SLO attainment target
    decision_time_s: float  # wall-clock seconds the planner took
    iterations: int  # tabu iterations run
    history: tuple[float, ...]  # best search objective (routing LP served rate, req/s) after each iteration
    start_objective: float = 0.0  # the search objective of the bandwidth-aware starting grouping
    # with verify_top: (estimated, re-scored) max rate of each candidate, best estimate first; the chosen plan
    # is the one with the highest re-scored rate
    verified: tuple[tuple[float, float], ...] = ()
    evaluations: int = 0  # distinct states the tabu search scored (the budget spent)
    stopped_by: str = "budget"  # what ended the search: "budget", "iterations", "patience" or "time_limit"
