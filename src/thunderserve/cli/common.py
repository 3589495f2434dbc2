"""Shared CLI plumbing: option loading, JSON/table output, and the one-line error contract (exit 2)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console

from thunderserve.errors import SpecError
from thunderserve.scheduler.config import DEFAULT_MAX_EVALUATIONS
from thunderserve.spec.slo import DEFAULT_ATTAINMENT, DEFAULT_SLO_SCALE

if TYPE_CHECKING:  # imported where used: option parsing and --help need none of them (CLI start-up)
    from thunderserve.spec import Cluster, ModelSpec, SloSpec, WorkloadSpec

PIPE_WIDTH = 400  # columns when printing to a pipe or file: tables keep full names (rich would assume 80)


def _width(stream: Any) -> int | None:
    """None (the terminal's own width) on a terminal, else PIPE_WIDTH; COLUMNS, when set, wins as usual."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH


console = Console(stderr=True, width=_width(sys.stderr))  # progress and tables for humans: stderr under --json
out = Console(width=_width(sys.stdout))

ClusterOpt = typer.Option(..., "--cluster", help="Cluster YAML path or built-in scenario (paper-cloud-32, ...)")
ModelOpt = typer.Option("llama-30b", "--model", help="Model catalog name or HuggingFace config.json path")
WorkloadOpt = typer.Option("conversation", "--workload", help="Workload preset (coding, conversation) or trace CSV")
SloScaleOpt = typer.Option(None, "--slo", help=f"SLO scale over the reference latency (default {DEFAULT_SLO_SCALE})")
TtftOpt = typer.Option(None, "--ttft-ms", help="TTFT target in ms (overrides --slo)")
TpotOpt = typer.Option(None, "--tpot-ms", help="TPOT target in ms (overrides --slo)")
AttainOpt = typer.Option(DEFAULT_ATTAINMENT, "--attainment", help="Fraction of requests that must meet the SLO")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON on stdout")
BudgetOpt = typer.Option(DEFAULT_MAX_EVALUATIONS, "--budget",
                         help="Search budget: states the tabu search scores at most (same seed and budget, same "
                              "plan on any machine)")
TimeCapOpt = typer.Option(None, "--time-limit",
                          help="Optional wall-clock cap of the search, s (a capped search depends on machine speed)")


@dataclass(frozen=True)
class Inputs:
    """Everything a planning/simulation command needs, loaded and validated."""

    cluster: Cluster
    model: ModelSpec
    workload: WorkloadSpec
    slo: SloSpec


def make_slo(model: ModelSpec, workload: WorkloadSpec, scale: float | None, ttft_ms: float | None,
             tpot_ms: float | None, attainment: float) -> SloSpec:
    """Explicit targets win; otherwise scale x reference latency (see costmodel.reference)."""
    from thunderserve.costmodel.reference import slo_from_scale
    from thunderserve.spec import SloSpec

    if not 0 < attainment <= 1:
        raise SpecError("must be in (0, 1]", field="--attainment")
    if scale is not None and scale <= 0:
        raise SpecError("must be positive", field="--slo")
    base = slo_from_scale(model, workload, scale or DEFAULT_SLO_SCALE, attainment)
    if ttft_ms is not None or tpot_ms is not None:
        for name, v in (("--ttft-ms", ttft_ms), ("--tpot-ms", tpot_ms)):
            if v is not None and v <= 0:
                raise SpecError("must be positive", field=name)
        return SloSpec(ttft_ms=ttft_ms or base.ttft_ms, tpot_ms=tpot_ms or base.tpot_ms,
                       attainment_target=attainment)
    return base


def load_inputs(cluster: str, model: str, workload: str, scale: float | None = None,
                ttft_ms: float | None = None, tpot_ms: float | None = None,
                attainment: float = DEFAULT_ATTAINMENT) -> Inputs:
    from thunderserve.spec import load_cluster, load_model, load_workload

    m = load_model(model)
    w = load_workload(workload)
    return Inputs(load_cluster(cluster), m, w, make_slo(m, w, scale, ttft_ms, tpot_ms, attainment))


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    return str(obj)
