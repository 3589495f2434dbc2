"""vLLM baseline: independent colocated replicas of the best standard (TP, PP) shape per GPU type.

Models how a vLLM user deploys on a mixed fleet: per GPU type, identical replicas launched with one of the
standard `--tensor-parallel-size` / `--pipeline-parallel-size` shapes (TP inside a node, 1, 2, 4 or 8; PP up to
MAX_PP stages, inside a node or over that type's nodes, layers split evenly), the shape chosen by simulating
its replicas at the SLO (replicas whose stages cross the same links are simulated once) and keeping the
highest total rate (fewer GPUs on ties). As a user benchmarks a short list rather than every shape, the
SIMULATED_SHAPES shapes per type with the highest analytic total rate (the planner's estimate of one replica,
`scheduler.evaluate_plan`, times the replica count), and the best of each pipeline depth, are simulated. A least-outstanding-requests load balancer sits in front
(`Dispatch.LEAST_OUTSTANDING`, weighted by each replica's simulated capacity, as nginx's weighted least_conn).
Replicas run vLLM's chunked-prefill scheduler (the simulator's colocated mode; the comparison also tries the
older prefill-first policy and keeps the better). KV caches never move, so compression does not apply.
Leaves out: replicas mixing GPU types (vLLM needs identical GPUs per instance), uneven layer splits, prefix
caching, speculative decoding.
"""

from __future__ import annotations

from thunderserve.errors import InfeasibleError, ThunderServeError
from thunderserve.plan import Phase, Plan, Routing
from thunderserve.scheduler.baselines._common import (
    Shape,
    candidate_shapes,
    carve,
    make_group,
    nodes_of_type,
    normalised,
    rate_of,
    single_group_plan,
)
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

SIMULATED_SHAPES = 4  # per GPU type, best by analytic total rate


def _analytic_total(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                    carved: list[list[list[str]]]) -> float:
    from thunderserve.scheduler import evaluate_plan

    g = make_group("r", Phase.COLOCATED, carved[0], model.num_layers)
    try:
        one = float(evaluate_plan(single_group_plan(cluster, model, g, "vllm"), cluster, model, workload,
                                  slo)["max_rate_at_slo"])
    except ThunderServeError:
        return 0.0
    return one * len(carved)


def vllm_shapes(cluster: Cluster, model: ModelSpec, nodes: list[list[str]]) -> list[Shape]:
    """vLLM's standard shapes on one GPU type: TP inside a node, PP inside or across nodes, every one that fits."""
    return candidate_shapes(cluster, model, nodes)


def _links(cluster: Cluster, stages: list[list[str]]) -> tuple[float, ...]:
    """What distinguishes replicas of one shape on one GPU type: the links between consecutive stages."""
    by = cluster.by_id
    return tuple(cluster.min_bandwidth_bytes_s([by[x] for x in a], [by[x] for x in b])
                 for a, b in zip(stages, stages[1:], strict=False))


def plan_vllm(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec) -> Plan:
    """Best per-type vLLM replica layout on `cluster` (see module docstring)."""
    groups = []
    shares: dict[str, float] = {}
    chosen: dict[str, dict[str, float]] = {}
    for gpu_type in cluster.gpu_types():
        nodes = nodes_of_type(cluster, gpu_type)
        best: tuple[float, int, Shape, list[list[list[str]]], list[float]] | None = None
        options: list[tuple[float, int, Shape, list[list[list[str]]]]] = []
        for i, shape in enumerate(vllm_shapes(cluster, model, nodes)):
            total = sum(len(n) for n in nodes)
            count = total // shape.num_gpus
            carved = None
            while count > 0 and (carved := carve(nodes, [shape] * count)) is None:
                count -= 1
            if carved:
                options.append((_analytic_total(cluster, model, workload, slo, carved), i, shape, carved))
        options.sort(key=lambda o: (-o[0], o[1]))  # best analytic first; ties: smaller shapes first
        short = options[:SIMULATED_SHAPES]  # plus the best of each pipeline depth (the estimate may misjudge PP)
        short += [next(o for o in options if o[2].pp == pp) for pp in sorted({o[2].pp for o in options})
                  if not any(o[2].pp == pp for o in short)]
        for _, _, shape, carved in short:
            # Replicas crossing the same links are identical; pipelined ones may cross different links.
            rates: list[float] = []
            seen: dict[tuple[float, ...], float] = {}
            for stages in carved:
                key = _links(cluster, stages)
                if key not in seen:
                    g = make_group("r", Phase.COLOCATED, stages, model.num_layers)
                    seen[key] = rate_of(single_group_plan(cluster, model, g, "vllm"), cluster, model, workload, slo)
                rates.append(seen[key])
            key = (sum(rates), -shape.num_gpus)
            if best is None or key > (best[0], best[1]):
                best = (sum(rates), -shape.num_gpus, shape, carved, rates)
        if best is None:
            continue  # this GPU type cannot hold the model: its GPUs stay idle
        _, _, shape, carved, rates = best
        stem = gpu_type.lower().replace(" ", "-")
        for i, (stages, rate) in enumerate(zip(carved, rates, strict=True)):
            gid = f"vllm-{stem}-{i}"
            groups.append(make_group(gid, Phase.COLOCATED, stages, model.num_layers))
            shares[gid] = rate
        chosen[gpu_type] = {"tp": shape.tp, "pp": shape.pp, "replicas": len(carved),
                            "replica_rate_rps": rates[0]}
    if not groups:
        raise InfeasibleError(f"vllm: no GPU type of {cluster.name} can hold {model.name}")
    return Plan(model=model.name, cluster=cluster.name, groups=tuple(groups),
                routing=Routing(entry=normalised(shares)),
                estimate={"system": "vllm", "per_type": chosen, "scheduler": "chunked_prefill",
                          "dispatch": "least_outstanding", "rate_hint_rps": sum(shares.values())})
