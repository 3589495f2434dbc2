"""The Plan: the one decision object every subsystem consumes (scheduler -> sim, runtime, resched).

JSON (format "thunderserve.plan/v2"; v1 documents, which lack `kv_transfer.gate`, are still read):
    {"format": "thunderserve.plan/v2", "model": "llama-30b", "cluster": "paper-cloud-32",
     "kv_transfer": {"compression": "int8", "gate": {"passes_gate": true, "forced": false, "measured": false,
                                                     "source": "..."}},
     "groups": [{"id": "p0", "phase": "prefill",
                 "stages": [{"gpus": ["n0:0", "n0:1"], "layers": [0, 30]}, ...]}, ...],
     "routing": {"entry": {"p0": 0.7, "c0": 0.3}, "kv": {"p0": {"d0": 1.0}}},
     "estimate": {...}}
A stage is a tensor-parallel set of GPUs holding the half-open layer range `layers`; a group's stages cover
all layers in order. `routing.entry` splits arriving requests over prefill and colocated groups;
`routing.kv[p]` splits prefill group p's KV caches over decode groups. `kv_transfer.gate` is the KV quality
gate's verdict on the compression for this model when the plan was made (`quality.gate`; absent: not checked).
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from thunderserve.costmodel.comm import Compression
from thunderserve.errors import PlanError
from thunderserve.spec._load import first_error

PLAN_FORMAT = "thunderserve.plan/v2"
READABLE_FORMATS = ("thunderserve.plan/v1", PLAN_FORMAT)  # v1: no kv_transfer.gate


class Phase(StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


class Stage(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    gpus: tuple[str, ...] = Field(min_length=1)  # GPU ids "<node>:<index>", one TP rank each
    layers: tuple[int, int]  # half-open [start, end)

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def tp(self) -> int:
        return len(self.gpus)


class Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    phase: Phase
    stages: tuple[Stage, ...] = Field(min_length=1)

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(g for s in self.stages for g in s.gpus)

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def takes_requests(self) -> bool:
        return self.phase in (Phase.PREFILL, Phase.COLOCATED)

    def with_phase(self, phase: Phase) -> Group:
        return self.model_copy(update={"phase": phase})


class Routing(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    entry: dict[str, float] = {}  # group id -> share of arriving requests
    kv: dict[str, dict[str, float]] = {}  # prefill group id -> decode group id -> share of its KV caches


class KvGate(BaseModel):
    """The KV quality gate's verdict on a plan's compression for its model (`quality.gate.GateVerdict`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    passes_gate: bool  # the level passed the gate (or is allowed unmeasured: none is exact, int8 the fallback)
    forced: bool  # the user forced this level (`--kv-compression LEVEL`), rather than `auto` choosing it
    measured: bool  # a stored gate result for the model backs the verdict
    source: str  # where the verdict comes from


class KvTransfer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    compression: Compression = Compression.NONE
    gate: KvGate | None = None  # the gate's verdict when planned; None: not checked (library callers, v1 plans)


class Plan(BaseModel):
    """A deployment: groups with phases and layouts, routing shares, and the planner's estimate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: str = PLAN_FORMAT
    model: str
    cluster: str
    kv_transfer: KvTransfer = KvTransfer()
    groups: tuple[Group, ...] = Field(min_length=1)
    routing: Routing | None = None
    estimate: dict[str, Any] = {}

    def group(self, group_id: str) -> Group:
        for g in self.groups:
            if g.id == group_id:
                return g
        raise KeyError(group_id)

    @property
    def gpus(self) -> tuple[str, ...]:
        return tuple(g for grp in self.groups for g in grp.gpus)

    def groups_in(self, *phases: Phase) -> list[Group]:
        return [g for g in self.groups if g.phase in phases]

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json")
        if d["kv_transfer"].get("gate") is None:  # unchecked: leave the optional field out
            del d["kv_transfer"]["gate"]
        return d


def plan_from_dict(data: Any, source: str = "plan") -> Plan:
    """Parse a plan object, checking the format version; errors name the field."""
    if not isinstance(data, dict):
        raise PlanError(f"{source}: expected a JSON object")
    fmt = data.get("format", PLAN_FORMAT)
    if fmt not in READABLE_FORMATS:
        raise PlanError(f"{source}: format: unsupported plan format '{fmt}' (expected one of "
                        f"{', '.join(READABLE_FORMATS)})")
    if fmt != PLAN_FORMAT:
        data = {**data, "format": PLAN_FORMAT}  # v1 is v2 without the optional kv_transfer.gate
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise PlanError(f"{source}: {field}: {msg}") from None


def load_plan(path: Path | str) -> Plan:
    """Read a plan JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise PlanError(f"{p}: file not found") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{p}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    return plan_from_dict(data, str(p))
