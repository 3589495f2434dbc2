"""DistServe baseline: prefill/decode disaggregation planned per homogeneous island, network-unaware.

Models: DistServe's placement search for a homogeneous cluster: the best parallel configuration of a
prefill instance and of a decode instance (TP inside a node, PP over nodes) and the replica counts of each,
chosen for goodput at the SLO assuming fast links (KV transfer free). Candidates are ranked by per-phase
goodput (analytic, `_common.prefill_rate_rps` / `decode_rate_rps`), the best few island layouts are then
simulated with free KV transfer (`SimConfig.ideal_kv_links`, DistServe's own assumption), and the best is
kept. Placement follows DistServe's two algorithms: where the island's nodes are joined by a fast network
(>= FAST_CROSS_NODE_GBPS, e.g. InfiniBand) instances are placed freely ("low node-affinity"); otherwise
("high node-affinity", its algorithm for clusters with limited cross-node bandwidth) every prefill instance
is paired with decode instances in its own node and sends its KV only inside the node, falling back to
free placement when no such pairing fits (e.g. an instance needs a whole node). On a heterogeneous cluster every GPU type is planned as its own island (DistServe has no notion of
mixed GPU types); requests are spread over islands in proportion to their simulated capacity, and inside an
island each prefill instance spreads its KV caches over the island's decode instances in proportion to
their goodput. The final plan is simulated (and reported) with the real links and no KV compression.
Leaves out: its runtime details (its own batching kernels), instances spanning GPU types, and islands that
cannot hold one prefill and one decode instance (their GPUs stay idle).
"""

from __future__ import annotations

from dataclasses import dataclass

from thunderserve.errors import InfeasibleError
from thunderserve.plan import Group, Phase, Plan, Routing, group_perf_of
from thunderserve.scheduler.baselines._common import (
    SEARCH_SIM,
    Shape,
    candidate_shapes,
    carve,
    decode_rate_rps,
    make_group,
    nodes_of_type,
    normalised,
    prefill_rate_rps,
    rate_of,
)
from thunderserve.sim.config import SimConfig
from thunderserve.spec.cluster import GBPS_TO_BYTES, Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

SIMULATED_CANDIDATES = 8  # island layouts simulated after the analytic ranking
FAST_LINKS = SimConfig(batching=SEARCH_SIM.batching, warmup_s=SEARCH_SIM.warmup_s, ideal_kv_links=True)
FAST_CROSS_NODE_GBPS = 100.0  # DistServe's line between its low- and high-node-affinity placements


@dataclass(frozen=True)
class IslandLayout:
    prefill: Shape
    decode: Shape
    num_prefill: int  # in the island, or per node with affinity
    num_decode: int  # in the island, or per node with affinity
    analytic_rps: float  # min(prefill, decode) goodput, analytic
    slack_rps: float  # max(prefill, decode) goodput: room left on the other phase
    affinity: bool = False  # prefill and decode instances paired inside each node

    @property
    def num_gpus(self) -> int:
        return self.prefill.num_gpus * self.num_prefill + self.decode.num_gpus * self.num_decode


def fast_cross_node(cluster: Cluster, nodes: list[list[str]]) -> bool:
    """Whether every pair of the island's nodes is joined by a fast network (DistServe's deciding fact)."""
    idx = sorted({cluster.by_id[n[0]].node_index for n in nodes})
    if len(idx) < 2:
        return True
    bw = cluster.node_bandwidth_bytes_s
    slowest = min(float(bw[i, j]) for i in idx for j in idx if i != j)
    return slowest >= FAST_CROSS_NODE_GBPS * GBPS_TO_BYTES


def _interleaved(layout: IslandLayout) -> list[list[tuple[str, Shape]]]:
    """Orders to carve instances in: P, D, P, D, ... first, then all P before all D."""
    p, d = layout.num_prefill, layout.num_decode
    inter: list[tuple[str, Shape]] = []
    for i in range(max(p, d)):
        if i < p:
            inter.append(("p", layout.prefill))
        if i < d:
            inter.append(("d", layout.decode))
    return [inter, [("p", layout.prefill)] * p + [("d", layout.decode)] * d]


def _carve_one(nodes: list[list[str]], layout: IslandLayout) -> tuple[list, list] | None:
    for order in _interleaved(layout):
        got = carve(nodes, [s for _, s in order])
        if got is not None:
            kinds = [k for k, _ in order]
            return ([g for k, g in zip(kinds, got, strict=True) if k == "p"],
                    [g for k, g in zip(kinds, got, strict=True) if k == "d"])
    return None


def _carve_island(nodes: list[list[str]], layout: IslandLayout) -> list[tuple[list, list]] | None:
    """(prefill stage GPUs, decode stage GPUs) per KV domain: the island, or each node with affinity."""
    if not layout.affinity:
        got = _carve_one(nodes, layout)
        return None if got is None else [got]
    out = []
    for node in nodes:
        got = _carve_one([node], layout)
        if got is None:
            return None
        out.append(got)
    return out


def island_layouts(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                   nodes: list[list[str]], affinity: bool) -> list[IslandLayout]:
    """Every feasible (prefill shape, decode shape, counts) of an island, best analytic goodput first."""
    shapes = candidate_shapes(cluster, model, nodes)
    if affinity:
        size = min(len(n) for n in nodes)
        shapes = [s for s in shapes if s.pp == 1 and s.tp < size]
    domains = len(nodes) if affinity else 1
    total = min(len(n) for n in nodes) if affinity else sum(len(n) for n in nodes)
    rates: dict[Shape, tuple[float, float]] = {}
    for s in shapes:
        stages = carve(nodes, [s])
        assert stages is not None
        perf = group_perf_of(make_group("x", Phase.PREFILL, stages[0], model.num_layers), model, cluster)
        rates[s] = (prefill_rate_rps(perf, workload, slo), decode_rate_rps(perf, workload, slo))
    out: list[IslandLayout] = []
    for sp in shapes:
        for sd in shapes:
            for n_p in range(1, total // sp.num_gpus + 1):
                left = total - n_p * sp.num_gpus
                for n_d in range(left // sd.num_gpus, 0, -1):
                    rp, rd = domains * n_p * rates[sp][0], domains * n_d * rates[sd][1]
                    lay = IslandLayout(sp, sd, n_p, n_d, min(rp, rd), max(rp, rd), affinity)
                    if _carve_island(nodes, lay) is not None:
                        out.append(lay)
                        break
    # Ties on the bottleneck phase are broken by the slack of the other phase, then by fewer GPUs.
    out.sort(key=lambda x: (-x.analytic_rps, -x.slack_rps, x.num_gpus, x.prefill.pp, x.decode.pp, x.prefill.tp,
                            x.decode.tp))
    return out


def _island_plan(cluster: Cluster, model: ModelSpec, stem: str, carved: list[tuple[list, list]]
                 ) -> tuple[Plan, list[Group], list[Group], dict[str, dict[str, float]]]:
    """Groups of an island; each prefill instance sends KV to the decode instances of its own domain."""
    pre: list[Group] = []
    dec: list[Group] = []
    kv: dict[str, dict[str, float]] = {}
    for p_stages, d_stages in carved:
        ps = [make_group(f"ds-{stem}-p{len(pre) + i}", Phase.PREFILL, g, model.num_layers)
              for i, g in enumerate(p_stages)]
        ds = [make_group(f"ds-{stem}-d{len(dec) + i}", Phase.DECODE, g, model.num_layers)
              for i, g in enumerate(d_stages)]
        for p in ps:
            kv[p.id] = normalised({d.id: 1.0 for d in ds})
        pre += ps
        dec += ds
    plan = Plan(model=model.name, cluster=cluster.name, groups=tuple(pre + dec),
                routing=Routing(entry=normalised({g.id: 1.0 for g in pre}), kv=kv), estimate={"system": "distserve"})
    return plan, pre, dec, kv


def plan_distserve(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec) -> Plan:
    """DistServe's per-island placement on `cluster` (see module docstring)."""
    groups: list[Group] = []
    entry: dict[str, float] = {}
    kv: dict[str, dict[str, float]] = {}
    chosen: dict[str, dict[str, object]] = {}
    for gpu_type in cluster.gpu_types():
        nodes = nodes_of_type(cluster, gpu_type)
        stem = gpu_type.lower().replace(" ", "-")
        layouts = []
        if not fast_cross_node(cluster, nodes):
            layouts = island_layouts(cluster, model, workload, slo, nodes, affinity=True)
        if not layouts:
            layouts = island_layouts(cluster, model, workload, slo, nodes, affinity=False)
        best = None
        for layout in layouts[:SIMULATED_CANDIDATES]:
            carved = _carve_island(nodes, layout)
            assert carved is not None
            plan, pre, dec, island_kv = _island_plan(cluster, model, stem, carved)
            rate = rate_of(plan, cluster, model, workload, slo, FAST_LINKS, hint=layout.analytic_rps or None)
            if best is None or rate > best[0]:
                best = (rate, layout, pre, dec, island_kv)
        if best is None:
            continue  # the island cannot hold a prefill and a decode instance
        rate, layout, pre, dec, island_kv = best
        groups += pre + dec
        kv.update(island_kv)
        for p in pre:
            entry[p.id] = rate / len(pre)
        chosen[gpu_type] = {"placement": "high_node_affinity" if layout.affinity else "low_node_affinity",
                            "prefill": {"tp": layout.prefill.tp, "pp": layout.prefill.pp, "replicas": len(pre)},
                            "decode": {"tp": layout.decode.tp, "pp": layout.decode.pp, "replicas": len(dec)},
                            "island_rate_rps_fast_links": rate}
    if not groups:
        raise InfeasibleError(f"distserve: no GPU type of {cluster.name} holds a prefill and a decode instance "
                              f"of {model.name}")
    return Plan(model=model.name, cluster=cluster.name, groups=tuple(groups),
                routing=Routing(entry=normalised(entry), kv=kv),
                estimate={"system": "distserve", "per_island": chosen, "rate_hint_rps": sum(entry.values())})
