"""What every system in a comparison is given: the one table (`SYSTEMS`) the comparison, its JSON and the README
read from.

Each entry says how the system is planned (its planner), which parallel shapes it may use, how requests are
dispatched, whether KV caches are compressed, how its replicas batch (the simulator knobs it runs with), and
whether it searches (then `--verify-top` applies to it, as to every other system that searches: equal
treatment). Peers run as their users run them (`published=True`); our ablations carry our name.

ThunderServe itself is reported once per KV compression level its quality gate allows for the model
(`thunderserve-<level>`, `thunderserve-uncompressed` for none) plus its default (`thunderserve`: the most
compressed level the gate allows, what the planner's `auto` picks; every level when the gate is not installed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from thunderserve.costmodel.comm import Compression
from thunderserve.plan import Phase, Plan
from thunderserve.policy.routing import Dispatch
from thunderserve.sim.config import SimConfig
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

THUNDERSERVE = "thunderserve"
PUBLISHED_PEERS = ("vllm", "distserve", "hexgen")  # the ratios the issue asks for are taken against these
ABLATIONS = ("thunderserve-colocated", "thunderserve-uncompressed")
ONE_REQUEST_PER_CALL = 1  # HexGen's runtime: one sequence at a time per group, no continuous batching


@dataclass(frozen=True)
class PlanKnobs:
    """What every searching system gets alike: the same budget, seed and verification."""

    budget: int  # states the tabu search scores (SchedulerConfig.max_evaluations)
    seed: int = 0
    verify_top: int = 0  # re-score the K best candidates by simulation (0: off), for every system that searches
    time_limit_s: float | None = None  # optional wall-clock cap (results then depend on the machine)
    kv_compression: str | None = None  # ThunderServe's level when the user forced one (None: the KV gate decides)


# (cluster, model, workload, slo, knobs, the system's simulator config, memo shared within one comparison)
SystemPlanner = Callable[[Cluster, ModelSpec, WorkloadSpec, SloSpec, PlanKnobs, SimConfig, dict[Any, Plan]], Plan]


@dataclass(frozen=True)
class SystemSpec:
    """One system under comparison and what it is given."""

    name: str
    plan: SystemPlanner  # (cluster, model, workload, slo, knobs, its simulator config) -> Plan
    published: bool  # a peer configured as its users run it (False: ThunderServe or an ablation of it)
    searches: bool  # runs a search that --verify-top applies to
    shapes: str  # the parallel layouts it may use
    dispatch: Dispatch  # how the simulator dispatches its requests and KV caches
    kv_compression: str  # "none", "int8", "int4", or "planner" (the gate-allowed level the planner picks)
    scheduler: str  # how its replicas batch
    max_num_seqs: int | None = None  # caps the simulator's sequences per group (None: the comparison's own)
    colocated_policies: tuple[str, ...] = ("chunked", "prefill_first")  # tried for colocated-only plans
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def sim_config(self, base: SimConfig) -> SimConfig:
        """The simulator knobs this system runs with, from the comparison's base config."""
        batching = base.batching if self.max_num_seqs is None else \
            replace(base.batching, max_batch_size=min(self.max_num_seqs, base.batching.max_batch_size))
        return replace(base, dispatch=self.dispatch, batching=batching)

    def describe(self, knobs: PlanKnobs) -> dict[str, Any]:
        """The `config` entry of `compare --json`: what this system was given."""
        out: dict[str, Any] = {"published_peer": self.published, "shapes": self.shapes,
                               "dispatch": str(self.dispatch), "kv_compression": self.kv_compression,
                               "scheduler": self.scheduler, "searches": self.searches}
        if self.searches:
            out.update({"search_budget_evaluations": knobs.budget, "seed": knobs.seed,
                        "verify_top": knobs.verify_top, "time_limit_s": knobs.time_limit_s})
        if self.max_num_seqs is not None:
            out["max_num_seqs"] = self.max_num_seqs
        if self.notes:
            out["notes"] = self.notes
        return out


def allowed_kv_levels(model: ModelSpec) -> list[str]:
    """KV compression levels the quality gate allows for `model`, least compressed first; every level when
    the gate (issue 12's `thunderserve.quality.gate`) is not installed."""
    try:
        from thunderserve.quality.gate import allowed_levels  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return [str(c) for c in Compression]
    return list(allowed_levels(model.name))


def default_kv_level(model: ModelSpec) -> str:
    """ThunderServe's default KV compression: the most compressed level the gate allows for `model`."""
    return allowed_kv_levels(model)[-1]


def _search(phases: tuple[Phase, ...], compression: Compression | None, system: str) -> SystemPlanner:
    """A system planned by ThunderServe's search (restricted to `phases`, with `compression`; None: the
    default level), verification re-scoring candidates with the system's own simulator config. Identical
    searches within one comparison (e.g. hexgen's and thunderserve-colocated's without verification) run once."""
    def run(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec, knobs: PlanKnobs,
            sim: SimConfig, memo: dict[Any, Plan]) -> Plan:
        from thunderserve.scheduler import SchedulerConfig, plan_deployment
        from thunderserve.sim import rescorer

        level = compression if compression is not None else Compression(
            knobs.kv_compression if knobs.kv_compression is not None else default_kv_level(model))
        # the planner's choice (no level fixed, none forced): searched at the most compressed level the gate
        # allows, finalised at whichever allowed level the estimate rates highest
        choose = compression is None and knobs.kv_compression is None
        alternatives = tuple(Compression(lv) for lv in allowed_kv_levels(model)) if choose else ()
        key = (cluster.name, phases, level, alternatives, knobs, sim if knobs.verify_top > 1 else None)
        if key not in memo:
            cfg = SchedulerConfig(max_evaluations=knobs.budget, time_limit_s=knobs.time_limit_s, seed=knobs.seed,
                                  verify_top=knobs.verify_top, phases=phases, kv_compression=level,
                                  kv_alternatives=alternatives)
            result = plan_deployment(cluster, model, workload, slo, config=cfg,
                                     rescore=rescorer(cluster, model, workload, slo, config=sim))
            est = dict(result.plan.estimate)
            est.setdefault("planner_max_rate_rps", result.max_rate_at_slo)
            est.update({"search_evaluations": result.evaluations, "search_stopped_by": result.stopped_by})
            memo[key] = result.plan.model_copy(update={"estimate": est})
        plan = memo[key]
        return plan.model_copy(update={"estimate": {**plan.estimate, "system": system}})

    return run


def _baseline(name: str) -> SystemPlanner:
    def run(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec, knobs: PlanKnobs,
            sim: SimConfig, memo: dict[Any, Plan]) -> Plan:
        from thunderserve.scheduler.baselines import BASELINES

        return BASELINES[name](cluster, model, workload, slo)

    return run


ALL_PHASES = (Phase.PREFILL, Phase.DECODE, Phase.COLOCATED)
OUR_SHAPES = "any grouping of GPUs (mixed types, asymmetric TP/PP stages), prefill/decode/colocated groups"
OUR_SCHEDULER = "continuous batching; chunked prefill in colocated groups (or prefill-first, the better)"


def thunderserve_system(level: str | None) -> SystemSpec:
    """ThunderServe at a fixed KV compression level (None: the planner's default choice)."""
    name = THUNDERSERVE if level is None else (
        "thunderserve-uncompressed" if level == "none" else f"thunderserve-{level}")
    return SystemSpec(name=name, plan=_search(ALL_PHASES, None if level is None else Compression(level), name),
                      published=False, searches=True, shapes=OUR_SHAPES, dispatch=Dispatch.LEAST_OUTSTANDING,
                      kv_compression="planner" if level is None else level, scheduler=OUR_SCHEDULER)


SYSTEMS: dict[str, SystemSpec] = {
    THUNDERSERVE: thunderserve_system(None),
    "thunderserve-uncompressed": thunderserve_system("none"),
    "thunderserve-colocated": SystemSpec(
        name="thunderserve-colocated", plan=_search((Phase.COLOCATED,), Compression.NONE, "thunderserve-colocated"),
        published=False, searches=True, shapes="any grouping, asymmetric TP/PP, colocated groups only",
        dispatch=Dispatch.LEAST_OUTSTANDING, kv_compression="none", scheduler=OUR_SCHEDULER,
        notes="our search restricted to colocated groups (was labelled 'hexgen' before)"),
    "vllm": SystemSpec(
        name="vllm", plan=_baseline("vllm"), published=True, searches=False,
        shapes="per GPU type, replicas of one standard (TP in a node, PP in or across the type's nodes) shape, "
               "chosen by simulation",
        dispatch=Dispatch.LEAST_OUTSTANDING, kv_compression="none",
        scheduler="vLLM continuous batching, chunked prefill (or prefill-first, the better)"),
    "distserve": SystemSpec(
        name="distserve", plan=_baseline("distserve"), published=True, searches=False,
        shapes="per GPU type: high affinity per-instance TP/PP search; low affinity cross-node pipelines with "
               "per-node prefill and decode segments (KV inside the node)",
        dispatch=Dispatch.LEAST_OUTSTANDING, kv_compression="none",
        scheduler="disaggregated: prefill batches under a token budget, continuous-batching decode",
        colocated_policies=()),
    "hexgen": SystemSpec(
        name="hexgen", plan=_search((Phase.COLOCATED,), Compression.NONE, "hexgen"), published=True, searches=True,
        shapes="any grouping, asymmetric TP/PP over heterogeneous GPUs, colocated (no prefill/decode split)",
        dispatch=Dispatch.LEAST_OUTSTANDING, kv_compression="none",
        scheduler="HexGen's runtime: one request per call, no continuous batching",
        max_num_seqs=ONE_REQUEST_PER_CALL,
        notes="HexGen's genetic search is replaced by ours restricted to colocated groups (at least as strong); "
              "verification re-scores candidates under its one-request runtime"),
}
DEFAULT_SYSTEMS = ("thunderserve", "thunderserve-uncompressed", "thunderserve-colocated", "vllm", "distserve",
                   "hexgen")


def system(name: str, model: ModelSpec | None = None) -> SystemSpec:
    """The spec of `name`: a SYSTEMS entry, or `thunderserve-<level>` for a KV compression level."""
    if name in SYSTEMS:
        return SYSTEMS[name]
    level = name.removeprefix(f"{THUNDERSERVE}-")
    if name.startswith(f"{THUNDERSERVE}-") and level in {str(c) for c in Compression}:
        return thunderserve_system(level)
    from thunderserve.errors import SpecError

    raise SpecError(f"unknown system '{name}' (known: {', '.join(SYSTEMS)}, thunderserve-int8, thunderserve-int4)",
                    field="systems")


def per_level_systems(model: ModelSpec) -> list[str]:
    """ThunderServe once per KV compression level the gate allows (none is the uncompressed ablation), except
    the default level, which `thunderserve` itself reports."""
    default = default_kv_level(model)
    return ["thunderserve-uncompressed" if lv == "none" else f"thunderserve-{lv}"
            for lv in allowed_kv_levels(model) if lv != default]
