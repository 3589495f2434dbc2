"""vLLM baseline: independent colocated replicas, one parallel configuration per GPU type.

Models: no prefill/decode split; each GPU type is carved into identical replicas with that type's best
tensor-parallel degree inside a node (pipeline stages over nodes only when no single node of the type can
hold the model, as vLLM deployments do); the best degree is chosen by simulating one replica at the SLO and
multiplying by the replica count. Requests are spread over replicas in proportion to their simulated
capacity (a capacity-aware load balancer in front of vLLM). Replicas use vLLM's chunked-prefill scheduler
(the simulator's colocated mode; `SimConfig.colocated_policy=PREFILL_FIRST` gives the older policy).
Leaves out: cross-type groups (a replica never mixes GPU types), network awareness beyond one replica,
KV-cache paging with preemption (the whole prompt + output is reserved at admission, as in every system
simulated here), prefix caching, speculative decoding.
"""

from __future__ import annotations

from thunderserve.errors import InfeasibleError
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


def vllm_shapes(cluster: Cluster, model: ModelSpec, nodes: list[list[str]]) -> list[Shape]:
    """vLLM's options on one GPU type: TP inside a node; PP (fewest stages) only when no node holds it."""
    shapes = candidate_shapes(cluster, model, nodes)
    single = [s for s in shapes if s.pp == 1]
    if single or not shapes:
        return single
    fewest = min(s.pp for s in shapes)
    return [s for s in shapes if s.pp == fewest]


def plan_vllm(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec) -> Plan:
    """Best per-type vLLM replica layout on `cluster` (see module docstring)."""
    groups = []
    shares: dict[str, float] = {}
    chosen: dict[str, dict[str, float]] = {}
    for gpu_type in cluster.gpu_types():
        nodes = nodes_of_type(cluster, gpu_type)
        best: tuple[float, int, Shape, list[list[list[str]]], list[float]] | None = None
        for shape in vllm_shapes(cluster, model, nodes):
            total = sum(len(n) for n in nodes)
            count = total // shape.num_gpus
            carved = None
            while count > 0 and (carved := carve(nodes, [shape] * count)) is None:
                count -= 1
            if not carved:
                continue
            # Replicas inside one node are identical; pipelined ones may cross different links.
            rates: list[float] = []
            for i, stages in enumerate(carved):
                if i > 0 and shape.pp == 1:
                    rates.append(rates[0])
                    continue
                g = make_group("r", Phase.COLOCATED, stages, model.num_layers)
                rates.append(rate_of(single_group_plan(cluster, model, g, "vllm"), cluster, model, workload, slo))
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
                          "rate_hint_rps": sum(shares.values())})
