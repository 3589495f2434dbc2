"""The KV quality gate: which compression levels keep a model's answers, and what the planner may choose.

Thresholds live here and only here (`GATE`): a level passes when, on the fixed corpus (`quality.corpus`), its
perplexity is within +1% of the exact cache's and its teacher-forced top-1 agreement is >= 0.99 (README, "KV
quality gate", says why these numbers). Results come from `thunderserve bench-kv --json` (`quality.bench`):
the package ships them for the models measured here (`data/kv_gate/<model>.json`); a user measures another
model with `thunderserve bench-kv --model PATH --json > gate.json` and passes `--kv-gate gate.json` to `plan`.
Verdicts are recomputed from the stored metrics with `GATE`, so a stored file cannot disagree with the code.

For the planner (`choose_level`): `auto` picks the most compressed level that passes for the served model;
without stored results it falls back to `int8` (it passes on every model measured); `none` is exact and always
passes. A forced level is allowed, and its verdict travels with the plan. Pure: no torch, file reads only in
`load_results` / `stored_results`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from thunderserve.costmodel.comm import Compression
from thunderserve.errors import SpecError
from thunderserve.plan.model import KvGate, KvTransfer, Plan

LEVELS = ("none", "int8", "int4")  # compression levels, least compressed first (costmodel.comm.Compression)
FALLBACK_LEVEL = "int8"  # auto's choice when no results are stored for the model
STORAGE_YARDSTICKS = ("bf16-storage", "fp16-storage")  # a cache merely stored in 16 bits (no codec)
_MODEL_ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m"}


@dataclass(frozen=True)
class GateThresholds:
    """When a compression level keeps the model's answers (measured against the exact cache)."""

    max_perplexity_delta_rel: float = 0.01  # perplexity at most 1% above the exact cache's
    min_teacher_forced_agreement: float = 0.99  # top-1 next token equal to the exact cache's at >= 99% of steps

    def passes(self, perplexity_delta_rel: float, teacher_forced_agreement: float) -> bool:
        return (perplexity_delta_rel <= self.max_perplexity_delta_rel
                and teacher_forced_agreement >= self.min_teacher_forced_agreement)

    def describe(self) -> str:
        return (f"gate: perplexity within +{self.max_perplexity_delta_rel:.0%} of the exact cache and "
                f"teacher-forced top-1 agreement >= {self.min_teacher_forced_agreement:g}")

    def as_dict(self) -> dict[str, float]:
        return {"max_perplexity_delta_rel": self.max_perplexity_delta_rel,
                "min_teacher_forced_agreement": self.min_teacher_forced_agreement}


GATE = GateThresholds()


@dataclass(frozen=True)
class GateVerdict:
    """One level's standing for one model."""

    model: str
    level: str
    passes: bool  # may the planner choose it unforced
    measured: bool  # False: no stored result (none: exact by construction; int8: the fallback; int4: refused)
    source: str  # where the verdict comes from (a results file, or why there is none)
    perplexity_delta_rel: float | None = None
    teacher_forced_agreement: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "passes_gate": self.passes, "measured": self.measured, "source": self.source,
                "perplexity_delta_rel": self.perplexity_delta_rel,
                "teacher_forced_agreement": self.teacher_forced_agreement}


@dataclass(frozen=True)
class GateResults:
    """Stored bench-kv results for one model: per level, its perplexity change and teacher-forced agreement."""

    source: str
    levels: Mapping[str, tuple[float, float]]  # level -> (perplexity_delta_rel, teacher_forced_agreement)


def canonical_model(name: str) -> str:
    return _MODEL_ALIASES.get(name.lower(), name.lower())


def parse_results(data: Any, source: str) -> GateResults:
    """Gate results from a `bench-kv --json` document; SpecError naming the file and field when malformed."""
    levels = data.get("levels") if isinstance(data, dict) else None
    if not isinstance(levels, dict) or not levels:
        raise SpecError("not a bench-kv result (no 'levels' object)", source=source)
    out: dict[str, tuple[float, float]] = {}
    for name, lv in levels.items():
        try:
            out[str(name)] = (float(lv["perplexity_delta_rel"]), float(lv["teacher_forced_agreement"]))
        except (KeyError, TypeError, ValueError):
            raise SpecError(f"levels.{name}: needs numbers perplexity_delta_rel and teacher_forced_agreement",
                            source=source) from None
    return GateResults(source=source, levels=out)


def load_results(path: Path) -> GateResults:
    """Gate results from a file written by `thunderserve bench-kv --json`."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError("file not found", source=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read file ({exc.strerror})", source=str(path)) from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"malformed JSON: {exc.msg} (line {exc.lineno})", source=str(path)) from None
    return parse_results(data, str(path))


def stored_results(model: str) -> GateResults | None:
    """The results the package ships for `model` (its catalog name or an alias), or None."""
    name = canonical_model(model)
    res = files("thunderserve").joinpath("data", "kv_gate", f"{name}.json")
    if not res.is_file():
        return None
    return parse_results(json.loads(res.read_text()), f"package data kv_gate/{name}.json")


def gate_verdict(model: str, level: str, results: GateResults | None = None) -> GateVerdict:
    """`level`'s verdict for `model`, from `results` (default: the stored ones)."""
    if level not in LEVELS:
        raise ValueError(f"unknown KV compression level {level!r} (known: {', '.join(LEVELS)})")
    res = results if results is not None else stored_results(model)
    if res is not None and level in res.levels:
        delta, agree = res.levels[level]
        source = f"{res.source}: perplexity {delta:+.2%}, teacher-forced top-1 agreement {agree:.4f}"
        return GateVerdict(model, level, GATE.passes(delta, agree), True, source, delta, agree)
    if level == "none":
        return GateVerdict(model, level, True, False, "exact: the cache is sent unchanged")
    if level == FALLBACK_LEVEL:
        return GateVerdict(model, level, True, False,
                           f"no stored gate result for {model}: int8 is the fallback (it passes on every model "
                           "measured)")
    return GateVerdict(model, level, False, False,
                       f"no stored gate result for {model} (measure it: thunderserve bench-kv --json)")


def allowed_levels(model: str, results: GateResults | None = None) -> list[str]:
    """Levels the planner may choose for `model` unforced, least compressed first."""
    return [lv for lv in LEVELS if gate_verdict(model, lv, results).passes]


def stamp_plan(plan: Plan, verdict: GateVerdict, forced: bool) -> Plan:
    """`plan` with its KV compression set to the verdict's level and the verdict recorded (`kv_transfer.gate`)."""
    gate = KvGate(passes_gate=verdict.passes, forced=forced, measured=verdict.measured, source=verdict.source)
    return plan.model_copy(update={"kv_transfer": KvTransfer(compression=Compression(verdict.level), gate=gate)})


def gate_line(plan: Plan) -> str | None:
    """One line for the `plan` output: the level, how it was chosen, and whether it passed (None: unchecked)."""
    gate = plan.kv_transfer.gate
    if gate is None:
        return None
    if gate.passes_gate:
        state = "passes the KV quality gate" if gate.measured else "allowed without a gate measurement"
    else:
        state = "did NOT pass the KV quality gate (answers may change)"
    return (f"KV compression {plan.kv_transfer.compression} ({'forced' if gate.forced else 'auto'}): {state} "
            f"for {plan.model} ({gate.source})")


def choose_level(requested: str, model: str, results: GateResults | None = None) -> GateVerdict:
    """The level to plan with: `auto` -> the most compressed allowed level; else the requested level (forced,
    even when it fails: the verdict says so). ValueError on an unknown name."""
    req = requested.lower()
    if req == "auto":
        return gate_verdict(model, allowed_levels(model, results)[-1], results)
    return gate_verdict(model, req, results)
