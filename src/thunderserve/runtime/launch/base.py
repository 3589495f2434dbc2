"""From a Plan to worker launch specs, and the launcher seam (local processes or Ray actors).

One worker process per plan group. A group's pipeline stages each get their own engine for their layer range
(on their own device when there are GPUs; all on the CPU otherwise, each worker using `cpu_threads` torch
threads). A group whose stages have several plan GPUs runs tensor parallel: the worker is TP rank 0 and
spawns tp-1 follower processes, each holding its head/MLP shard of every stage (`workers.tensor_parallel`);
stages of unequal degree run at the smallest one. `collapse_tp=True` keeps the old behaviour (each stage on
its first GPU, one process), for small machines. The plan node a group runs on is the node of its first GPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Phase, Plan
from thunderserve.runtime.workers.protocol import WorkerConfig
from thunderserve.runtime.workers.server import WorkerLaunchSpec

SHARE_TOLERANCE = 1e-6


class LaunchError(RuntimeError):
    """A worker failed to start (its error is in the message)."""


@dataclass(frozen=True)
class WorkerEndpoint:
    """Where a started worker listens."""

    group_id: str
    host: str
    control_port: int
    kv_port: int
    pid: int
    weights_token: int
    node: str = ""  # plan node (Ray: the node it was placed on)


class Launcher(Protocol):
    """Starts one worker per spec and stops them all (idempotent); no orphans after `stop`."""

    def start(self, specs: list[WorkerLaunchSpec]) -> dict[str, WorkerEndpoint]: ...

    def stop(self, timeout_s: float = 10.0) -> None: ...

    def worker_pids(self) -> dict[str, int]: ...


def group_node(group: Group) -> str:
    """The plan node a group's worker runs on (node of its first GPU id "<node>:<index>")."""
    return group.stages[0].gpus[0].split(":", 1)[0]


def cuda_devices(plan: Plan, device_count: int) -> dict[str, tuple[str, ...]]:
    """Local GPU placement: each stage of each group uses the CUDA device numbered like its first plan GPU."""
    if device_count <= 0:
        return {}
    out = {}
    for g in plan.groups:
        devs = []
        for st in g.stages:
            index = st.gpus[0].rsplit(":", 1)[-1]
            devs.append(f"cuda:{int(index) % device_count if index.isdigit() else 0}")
        out[g.id] = tuple(devs)
    return out


def cuda_rank_devices(plan: Plan, device_count: int) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Local GPU placement of TP ranks: [rank][stage] -> the CUDA device numbered like the stage's rank-th GPU."""
    if device_count <= 0:
        return {}
    out = {}
    for g in plan.groups:
        tp = group_tp(g)
        out[g.id] = tuple(tuple(_cuda(st.gpus[r], device_count) for st in g.stages) for r in range(tp))
    return out


def _cuda(gpu: str, device_count: int) -> str:
    index = gpu.rsplit(":", 1)[-1]
    return f"cuda:{int(index) % device_count if index.isdigit() else 0}"


def group_tp(group: Group) -> int:
    """The tensor-parallel degree a group runs at (its smallest stage's, so every rank holds every stage)."""
    return min(st.tp for st in group.stages)


def check_servable(plan: Plan) -> None:
    """Checks the runtime needs whatever the cluster: routing present, shares valid, targets of the right phase."""
    if plan.routing is None:
        raise PlanError("routing: missing (the runtime needs entry and KV shares)")
    phases = {g.id: g.phase for g in plan.groups}

    def shares(where: str, values: Mapping[str, float], allowed: tuple[Phase, ...]) -> None:
        if not values:
            raise PlanError(f"{where}: no shares given")
        for gid, v in values.items():
            if gid not in phases:
                raise PlanError(f"{where}.{gid}: unknown group")
            if phases[gid] not in allowed:
                raise PlanError(f"{where}.{gid}: group is {phases[gid]}, expected {' or '.join(allowed)}")
            if not (math.isfinite(v) and v >= 0):
                raise PlanError(f"{where}.{gid}: share must be a finite number >= 0, got {v}")
        if abs(sum(values.values()) - 1.0) > SHARE_TOLERANCE:
            raise PlanError(f"{where}: shares sum to {sum(values.values()):.6f}, not 1")

    shares("routing.entry", plan.routing.entry, (Phase.PREFILL, Phase.COLOCATED))
    for src, dests in sorted(plan.routing.kv.items()):
        if phases.get(src) is not Phase.PREFILL:
            raise PlanError(f"routing.kv.{src}: not a prefill group")
        shares(f"routing.kv.{src}", dests, (Phase.DECODE,))
    for gid, phase in sorted(phases.items()):
        if phase is Phase.PREFILL and plan.routing.entry.get(gid, 0) > 0 and gid not in plan.routing.kv:
            raise PlanError(f"routing.kv: prefill group '{gid}' has no KV destination")


def worker_specs(plan: Plan, model: str, *, cpu_threads: int = 1, host: str = "127.0.0.1",
                 knobs: WorkerConfig | None = None, devices: Mapping[str, Sequence[str]] | None = None,
                 collapse_tp: bool = False, rank_devices: Mapping[str, Sequence[Sequence[str]]] | None = None,
                 secret: str | None = None) -> list[WorkerLaunchSpec]:
    """One launch spec per plan group (sorted by group id); `knobs` supplies non-plan worker settings.

    `devices[group]` names one torch device per pipeline stage (default: CPU for all); a group with several
    stages is served as a pipeline of stage engines (see `workers.pipeline`). A group with several GPUs per
    stage runs `group_tp` ranks unless `collapse_tp`; `rank_devices[group][rank][stage]` places them (default:
    every rank on the stage's device, i.e. the CPU without GPUs). `secret`: the deployment's, which the
    router and KV peers must prove to each worker (`serve` always makes one; None only for in-process tests).
    """
    check_servable(plan)
    out = []
    for g in sorted(plan.groups, key=lambda g: g.id):
        base = knobs or WorkerConfig(group_id=g.id, role=g.phase)
        config = replace(base, group_id=g.id, role=g.phase, compression=plan.kv_transfer.compression)
        devs = tuple((devices or {}).get(g.id, ())) or ("cpu",) * g.pp
        if len(devs) != g.pp:
            raise PlanError(f"groups.{g.id}: {len(devs)} devices given for {g.pp} stages")
        stages = tuple((s.layers[0], s.layers[1], d) for s, d in zip(g.stages, devs, strict=True))
        tp = 1 if collapse_tp else group_tp(g)
        ranks = tuple(tuple(r) for r in (rank_devices or {}).get(g.id, ()))[:tp] if tp > 1 else ()
        if ranks and (len(ranks) != tp or any(len(r) != g.pp for r in ranks)):
            raise PlanError(f"groups.{g.id}: rank devices must name {g.pp} device(s) for each of {tp} ranks")
        out.append(WorkerLaunchSpec(config=config, model=model, cpu_threads=cpu_threads, host=host,
                                    device=devs[0], stages=stages if g.pp > 1 else (), tp=tp, rank_devices=ranks,
                                    secret=secret))
    return out
