"""Shared pieces of the baseline planners: homogeneous instance shapes, GPU carving, per-phase rates.

Baselines build instances the way the systems they model do: tensor parallelism inside a node, pipeline
stages over consecutive TP sets (nodes in cluster order), layers split evenly over stages. Their searches
score candidates with the simulator (`rate_of`), on a lighter measurement protocol than the final report
(`SEARCH_LOAD`), after an analytic prefilter (`prefill_rate_rps` / `decode_rate_rps`) where the space is
large.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from thunderserve.costmodel.perf import GroupPerf
from thunderserve.plan import Group, Phase, Plan, Routing, Stage, group_perf_of
from thunderserve.policy.batching import BatchingConfig
from thunderserve.sim.config import LoadConfig, SimConfig
from thunderserve.sim.metrics import max_rate_at_slo
from thunderserve.sim.steptime import GroupTimer
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

SEARCH_LOAD = LoadConfig(duration_s=300.0, min_requests=800, seed=1, rate_tolerance=0.04)
SEARCH_SIM = SimConfig(warmup_s=30.0)
MAX_PP = 4


@dataclass(frozen=True)
class Shape:
    """A homogeneous instance: `pp` stages of `tp` GPUs each."""

    tp: int
    pp: int

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp


def nodes_of_type(cluster: Cluster, gpu_type: str) -> list[list[str]]:
    """GPU ids of each node holding `gpu_type`, nodes in cluster order."""
    by_node: dict[int, list[str]] = {}
    for g in cluster.gpus:
        if g.spec.name == gpu_type:
            by_node.setdefault(g.node_index, []).append(g.id)
    return [by_node[k] for k in sorted(by_node)]


def carve(nodes: Sequence[Sequence[str]], shapes: Sequence[Shape]) -> list[list[list[str]]] | None:
    """Assign GPUs to instances in order: each stage takes `tp` GPUs of one node (the first node with room),
    stages of an instance follow each other. Returns per instance the GPU ids of each stage, or None."""
    free = [list(n) for n in nodes]
    out: list[list[list[str]]] = []
    for shape in shapes:
        stages: list[list[str]] = []
        for _ in range(shape.pp):
            node = next((f for f in free if len(f) >= shape.tp), None)
            if node is None:
                return None
            stages.append(node[: shape.tp])
            del node[: shape.tp]
        out.append(stages)
    return out


def even_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Half-open layer ranges, as even as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, pp)
    bounds, start = [], 0
    for i in range(pp):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def make_group(gid: str, phase: Phase, stage_gpus: Sequence[Sequence[str]], num_layers: int) -> Group:
    layers = even_layers(num_layers, len(stage_gpus))
    return Group(id=gid, phase=phase, stages=tuple(Stage(gpus=tuple(g), layers=lr)
                                                   for g, lr in zip(stage_gpus, layers, strict=True)))


def shape_fits(cluster: Cluster, model: ModelSpec, nodes: Sequence[Sequence[str]], shape: Shape) -> bool:
    """Whether one instance of `shape` can be carved from `nodes` and holds the model with room for KV."""
    got = carve(nodes, [shape])
    if got is None or shape.pp > model.num_layers:
        return False
    return group_perf_of(make_group("x", Phase.COLOCATED, got[0], model.num_layers), model, cluster).fits


def candidate_shapes(cluster: Cluster, model: ModelSpec, nodes: Sequence[Sequence[str]]) -> list[Shape]:
    """Every (tp inside a node, pp <= MAX_PP over nodes) shape that fits, smallest first."""
    node_size = max(len(n) for n in nodes)
    total = sum(len(n) for n in nodes)
    tps = [t for t in (1, 2, 4, 8, 16) if t <= node_size]
    shapes = [Shape(tp, pp) for pp in range(1, MAX_PP + 1) for tp in tps if tp * pp <= total]
    return sorted((s for s in shapes if shape_fits(cluster, model, nodes, s)), key=lambda s: (s.num_gpus, s.pp))


def single_group_plan(cluster: Cluster, model: ModelSpec, group: Group, name: str) -> Plan:
    return Plan(model=model.name, cluster=cluster.name, groups=(group,),
                routing=Routing(entry={group.id: 1.0}), estimate={"system": name})


def rate_of(plan: Plan, cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
            config: SimConfig = SEARCH_SIM, hint: float | None = None) -> float:
    """Simulated max rate at the SLO on the search protocol (the baselines' own search tool)."""
    return max_rate_at_slo(plan, cluster, model, workload, slo, config, SEARCH_LOAD, rate_hint_rps=hint).rate_rps


def normalised(shares: dict[str, float]) -> dict[str, float]:
    """Shares summing to 1 (equal split when all are zero)."""
    total = sum(shares.values())
    if total <= 0:
        return {k: 1.0 / len(shares) for k in shares}
    return {k: v / total for k, v in shares.items()}


# -- analytic per-phase rates (prefilter only; the final choice is simulated) -----------------------------
def prefill_rate_rps(perf: GroupPerf, workload: WorkloadSpec, slo: SloSpec,
                     batching: BatchingConfig = BatchingConfig()) -> float:
    """Requests/s a prefill instance sustains with budget-filled batches (bounded by its KV memory, which
    holds the batch); 0 when the prompt at the attainment quantile cannot meet TTFT even alone."""
    p = workload.mean_prompt_tokens
    p2 = float((workload.prompt_tokens.astype(float) ** 2).mean())
    q = float(np.quantile(workload.prompt_tokens, slo.attainment_target))
    if perf.prefill_time_s(q, q * q, 1) > slo.ttft_s or perf.kv_capacity_tokens < q:
        return 0.0
    n = max(1, math.floor(min(batching.prefill_token_budget, perf.kv_capacity_tokens) / p))
    return n / perf.prefill_stage_max_s(n * p, n * p2, n)


def decode_rate_rps(perf: GroupPerf, workload: WorkloadSpec, slo: SloSpec,
                    batching: BatchingConfig = BatchingConfig()) -> float:
    """Requests/s a decode instance sustains: the largest KV-feasible batch whose step meets the TPOT target."""
    p, o = workload.mean_prompt_tokens, workload.mean_output_tokens
    timer = GroupTimer(perf)
    batch = min(batching.max_batch_size, math.floor(perf.kv_capacity_tokens / (p + o)))
    ctx = p + o / 2
    while batch >= 1 and timer.decode_step_s(batch, batch * ctx) > slo.tpot_s:
        batch -= 1
    if batch < 1:
        return 0.0
    return batch / (max(o - 1.0, 1.0) * timer.decode_step_s(batch, batch * ctx))
