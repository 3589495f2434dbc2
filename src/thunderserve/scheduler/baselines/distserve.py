"""DistServe baseline: its published placement algorithms, per homogeneous island, least-loaded dispatch.

Models (DistServe, OSDI'24, and `simdistserve/benchmarks/search_configs.py` in its repository), per GPU type:
  * high node-affinity (the island's nodes joined by a fast network, >= FAST_CROSS_NODE_GBPS, e.g.
    InfiniBand): the best parallel configuration of a prefill instance and of a decode instance searched
    independently (TP inside a node, PP over nodes), with the replica counts of each, placed freely.
  * low node-affinity (slower cross-node links): instances are pipelines over `pp_cross` nodes; on each node
    sit a prefill segment (tp_p x pp_p GPUs) and a decode segment (tp_d x pp_d) holding the same layers, so the
    KV cache of every layer moves inside its node (the simulator's per-segment KV transfer). A segment pair
    fits in one node; the unit is replicated over the island's node groups and inside each node. The
    pp_cross = 1 case with several prefill and decode instances per node is searched too.
Candidates are ranked by analytic per-phase goodput (`_common.prefill_rate_rps` / `decode_rate_rps`); the best
few are simulated with free KV transfer (`SimConfig.ideal_kv_links`, DistServe's own search assumption) and
the best is kept. Requests are dispatched to the least loaded prefill instance and KV caches to the least
loaded decode instance (`Dispatch.LEAST_OUTSTANDING`); KV is never compressed. On a heterogeneous cluster every
GPU type is its own island (DistServe has no notion of mixed GPU types); the plan's shares weight islands by
their simulated capacity. The final plan is simulated (and reported) with the real links.
Leaves out: its runtime's kernels, instances spanning GPU types, nodes left over when the island's node count
is not a multiple of pp_cross (idle), and islands that cannot hold one prefill and one decode instance.
"""

from __future__ import annotations

from dataclasses import dataclass

from thunderserve.errors import InfeasibleError
from thunderserve.plan import Group, Phase, Plan, Routing, Stage, group_perf_of
from thunderserve.policy.routing import Dispatch
from thunderserve.scheduler.baselines._common import (
    MAX_PP,
    SEARCH_SIM,
    Shape,
    candidate_shapes,
    carve,
    decode_rate_rps,
    even_layers,
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
FAST_LINKS = SimConfig(batching=SEARCH_SIM.batching, warmup_s=SEARCH_SIM.warmup_s, ideal_kv_links=True,
                       dispatch=Dispatch.LEAST_OUTSTANDING)
FAST_CROSS_NODE_GBPS = 100.0  # DistServe's line between its high- (fast) and low-affinity placements


@dataclass(frozen=True)
class IslandLayout:
    prefill: Shape
    decode: Shape
    num_prefill: int  # in the island, or per node with affinity
    num_decode: int  # in the island, or per node with affinity
    analytic_rps: float  # min(prefill, decode) goodput, analytic
    slack_rps: float  # max(prefill, decode) goodput: room left on the other phase
    affinity: bool = False  # prefill and decode instances paired inside each node (low affinity, pp_cross 1)
    pp_cross: int = 0  # > 0: low-affinity segments: instances pipelined over this many nodes (see module doc)

    @property
    def num_gpus(self) -> int:
        return self.prefill.num_gpus * self.num_prefill + self.decode.num_gpus * self.num_decode

    @property
    def placement(self) -> str:
        return "low_node_affinity" if self.affinity or self.pp_cross else "high_node_affinity"


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


StageSpec = tuple[list[str], tuple[int, int]]  # GPU ids and the half-open layer range of one stage
Domain = tuple[list[list[StageSpec]], list[list[StageSpec]]]  # (prefill instances, decode instances)


def _even(instances: list[list[list[str]]], num_layers: int) -> list[list[StageSpec]]:
    return [list(zip(inst, even_layers(num_layers, len(inst)), strict=True)) for inst in instances]


def _carve_island(nodes: list[list[str]], layout: IslandLayout, num_layers: int) -> list[Domain] | None:
    """Prefill and decode instances per KV domain (the island; each node with affinity; each unit of
    low-affinity segments), every stage with its layers."""
    if layout.pp_cross:
        return _carve_segments(nodes, layout, num_layers)
    if not layout.affinity:
        got = _carve_one(nodes, layout)
        return None if got is None else [(_even(got[0], num_layers), _even(got[1], num_layers))]
    out: list[Domain] = []
    for node in nodes:
        got = _carve_one([node], layout)
        if got is None:
            return None
        out.append((_even(got[0], num_layers), _even(got[1], num_layers)))
    return out


def _carve_segments(nodes: list[list[str]], layout: IslandLayout, num_layers: int) -> list[Domain] | None:
    """Low-affinity units: on each of `pp_cross` consecutive nodes a prefill segment (pp_p stages of tp_p
    GPUs) and a decode segment (pp_d stages of tp_d) of the same layers; as many units as the nodes hold."""
    c, sp, sd = layout.pp_cross, layout.prefill, layout.decode
    per_node = min(len(n) for n in nodes) // (sp.num_gpus + sd.num_gpus)
    if per_node < 1 or len(nodes) < c or sp.pp * c > num_layers or sd.pp * c > num_layers:
        return None
    seg_layers = even_layers(num_layers, c)
    out: list[Domain] = []
    for first in range(0, len(nodes) - c + 1, c):
        free = [list(nodes[first + k]) for k in range(c)]
        for _ in range(per_node):
            pre: list[StageSpec] = []
            dec: list[StageSpec] = []
            for k, (lo, hi) in enumerate(seg_layers):
                for shape, stages in ((sp, pre), (sd, dec)):
                    for a, b in even_layers(hi - lo, shape.pp):
                        stages.append((free[k][: shape.tp], (lo + a, lo + b)))
                        del free[k][: shape.tp]
            out.append(([pre], [dec]))
    return out


def segment_layouts(cluster: Cluster, model: ModelSpec, workload: WorkloadSpec, slo: SloSpec,
                    nodes: list[list[str]]) -> list[IslandLayout]:
    """DistServe's low-affinity configurations (pp_cross, tp_p, pp_p, tp_d, pp_d) that fit, with the analytic
    goodput of all their units; pp_cross = 1 is covered by `island_layouts(affinity=True)`."""
    size = min(len(n) for n in nodes)
    tps = [t for t in (1, 2, 4, 8) if t <= size]
    out: list[IslandLayout] = []
    for c in range(2, min(len(nodes), MAX_PP) + 1):
        for sp in (Shape(t, p) for t in tps for p in range(1, MAX_PP // c + 1)):
            for sd in (Shape(t, p) for t in tps for p in range(1, MAX_PP // c + 1)):
                if sp.num_gpus + sd.num_gpus > size:
                    continue
                lay = IslandLayout(sp, sd, 0, 0, 0.0, 0.0, pp_cross=c)
                domains = _carve_segments(nodes, lay, model.num_layers)
                if not domains:
                    continue
                pre, dec = domains[0][0][0], domains[0][1][0]
                groups = [_group("x", ph, inst) for ph, inst in ((Phase.PREFILL, pre), (Phase.DECODE, dec))]
                perf_p, perf_d = (group_perf_of(g, model, cluster) for g in groups)
                if not (perf_p.fits and perf_d.fits):
                    continue
                rp = len(domains) * prefill_rate_rps(perf_p, workload, slo)
                rd = len(domains) * decode_rate_rps(perf_d, workload, slo)
                out.append(IslandLayout(sp, sd, len(domains), len(domains), min(rp, rd), max(rp, rd), pp_cross=c))
    return out


def _group(gid: str, phase: Phase, stages: list[StageSpec]) -> Group:
    return Group(id=gid, phase=phase, stages=tuple(Stage(gpus=tuple(g), layers=lr) for g, lr in stages))


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
                    if _carve_island(nodes, lay, model.num_layers) is not None:
                        out.append(lay)
                        break
    return out


def _island_plan(cluster: Cluster, model: ModelSpec, stem: str, carved: list[Domain]
                 ) -> tuple[Plan, list[Group], list[Group], dict[str, dict[str, float]]]:
    """Groups of an island; each prefill instance sends KV to the decode instances of its own domain."""
    pre: list[Group] = []
    dec: list[Group] = []
    kv: dict[str, dict[str, float]] = {}
    for p_insts, d_insts in carved:
        ps = [_group(f"ds-{stem}-p{len(pre) + i}", Phase.PREFILL, g) for i, g in enumerate(p_insts)]
        ds = [_group(f"ds-{stem}-d{len(dec) + i}", Phase.DECODE, g) for i, g in enumerate(d_insts)]
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
        layouts: list[IslandLayout] = []
        if not fast_cross_node(cluster, nodes):
            layouts = island_layouts(cluster, model, workload, slo, nodes, affinity=True)
            layouts += segment_layouts(cluster, model, workload, slo, nodes)
        if not layouts:
            layouts = island_layouts(cluster, model, workload, slo, nodes, affinity=False)
        # Ties on the bottleneck phase are broken by the slack of the other phase, then by fewer GPUs.
        layouts.sort(key=lambda x: (-x.analytic_rps, -x.slack_rps, x.num_gpus, x.pp_cross, x.prefill.pp,
                                    x.decode.pp, x.prefill.tp, x.decode.tp))
        best = None
        for layout in layouts[:SIMULATED_CANDIDATES]:
            carved = _carve_island(nodes, layout, model.num_layers)
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
        chosen[gpu_type] = {"placement": layout.placement, "pp_cross": max(layout.pp_cross, 1),
                            "prefill": {"tp": layout.prefill.tp, "pp": layout.prefill.pp * max(layout.pp_cross, 1),
                                        "replicas": len(pre)},
                            "decode": {"tp": layout.decode.tp, "pp": layout.decode.pp * max(layout.pp_cross, 1),
                                       "replicas": len(dec)},
                            "island_rate_rps_fast_links": rate}
    if not groups:
        raise InfeasibleError(f"distserve: no GPU type of {cluster.name} holds a prefill and a decode instance "
                              f"of {model.name}")
    return Plan(model=model.name, cluster=cluster.name, groups=tuple(groups),
                routing=Routing(entry=normalised(entry), kv=kv),
                estimate={"system": "distserve", "per_island": chosen, "rate_hint_rps": sum(entry.values()),
                          "dispatch": "least_outstanding"})
