"""One planning problem (cluster, model, workload sample, SLO, compression) with its memo tables.

Everything the search scores is cached here by value: layouts per (GPU set, phase), queueing models per
layout, KV link rates per (prefill layout, decode GPU set), and the per-group capacities the routing LP
uses. A move of the tabu search changes one or two groups, so almost every lookup of the next candidate
is a cache hit. The context is created per call of a public function (no global state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from thunderserve.costmodel.comm import Compression
from thunderserve.costmodel.kv import kv_seconds_per_token
from thunderserve.costmodel.perf import GroupPerf, group_perf
from thunderserve.plan.model import Group, Phase, Stage
from thunderserve.scheduler.layout import LayoutCandidate, best_layout_candidate
from thunderserve.scheduler.queueing import (
    ColocatedModel,
    DecodeModel,
    EdgeModel,
    PrefillModel,
    max_rate,
)
from thunderserve.scheduler.samples import LengthSample, length_sample
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

Stages = tuple[Stage, ...]


def component_target(slo: SloSpec) -> float:
    """Attainment each of two independent components (prefill+transfer, decode) must reach so that both
    hold for `attainment_target` of requests: the square root of the target."""
    return math.sqrt(slo.attainment_target)


@dataclass
class PlanningContext:
    cluster: Cluster
    model: ModelSpec
    workload: WorkloadSpec
    slo: SloSpec
    compression: Compression = Compression.INT4
    max_pp: int = 4
    sample: LengthSample = field(init=False)
    _layouts: dict[tuple[frozenset[str], Phase], LayoutCandidate | None] = field(default_factory=dict)
    _perf: dict[Stages, GroupPerf] = field(default_factory=dict)
    _prefill: dict[Stages, PrefillModel] = field(default_factory=dict)
    _decode: dict[Stages, DecodeModel] = field(default_factory=dict)
    _colocated: dict[Stages, ColocatedModel] = field(default_factory=dict)
    _spt: dict[tuple[Stages, frozenset[str]], float] = field(default_factory=dict)
    _edges: dict[float, EdgeModel] = field(default_factory=dict)
    _cap_edge: dict[tuple[Stages, float], float] = field(default_factory=dict)
    _cap_decode: dict[Stages, float] = field(default_factory=dict)
    _cap_colocated: dict[Stages, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sample = length_sample(self.workload)

    # ------------------------------------------------------------ layouts and models

    def layout(self, gpu_ids: frozenset[str], phase: Phase) -> LayoutCandidate | None:
        """Best layout of a GPU set for a phase, ranked by that phase's capacity (memoised)."""
        key = (gpu_ids, phase)
        if key not in self._layouts:
            self._layouts[key] = best_layout_candidate(
                sorted(gpu_ids, key=self.cluster.index_of.__getitem__), self.cluster, self.model, self.max_pp,
                phase, score=lambda perf: self.standalone_capacity(perf, phase))
            found = self._layouts[key]
            if found is not None:
                self._perf.setdefault(found.stages, found.perf)
        return self._layouts[key]

    def perf(self, stages: Stages) -> GroupPerf:
        if stages not in self._perf:
            self._perf[stages] = group_perf(
                self.model, [([self.cluster.by_id[g] for g in s.gpus], s.num_layers) for s in stages], self.cluster)
        return self._perf[stages]

    def prefill_model(self, stages: Stages) -> PrefillModel:
        if stages not in self._prefill:
            self._prefill[stages] = PrefillModel.build(self.perf(stages), self.sample)
        return self._prefill[stages]

    def decode_model(self, stages: Stages) -> DecodeModel:
        if stages not in self._decode:
            self._decode[stages] = DecodeModel.build(self.perf(stages), self.sample, self.slo.tpot_s)
        return self._decode[stages]

    def colocated_model(self, stages: Stages) -> ColocatedModel:
        if stages not in self._colocated:
            self._colocated[stages] = ColocatedModel.build(self.perf(stages), self.sample)
        return self._colocated[stages]

    def seconds_per_token(self, prefill: Stages, decode_gpus: frozenset[str]) -> float:
        """KV transfer seconds per prompt token from a prefill layout to a decode group (compressed)."""
        key = (prefill, decode_gpus)
        if key not in self._spt:
            by_id = self.cluster.by_id
            self._spt[key] = kv_seconds_per_token(
                self.model, [([by_id[g] for g in s.gpus], s.num_layers) for s in prefill],
                [by_id[g] for g in sorted(decode_gpus)], self.cluster, self.compression)
        return self._spt[key]

    def edge(self, seconds_per_token: float) -> EdgeModel:
        key = round(seconds_per_token, 15) if math.isfinite(seconds_per_token) else math.inf
        if key not in self._edges:
            self._edges[key] = EdgeModel.build(seconds_per_token, self.sample)
        return self._edges[key]

    def edge_usable(self, seconds_per_token: float) -> bool:
        """An edge is unusable when the KV transfer of a mean prompt alone would blow the TTFT budget."""
        e = self.edge(seconds_per_token)
        return e.usable and e.mean_s < self.slo.ttft_s

    # ------------------------------------------------------------ capacities (req/s at the SLO)

    def standalone_capacity(self, perf: GroupPerf, phase: Phase) -> float:
        """Capacity of a layout in isolation (prefill: with a free KV link), used to rank layouts."""
        tgt = component_target(self.slo)
        if phase is Phase.PREFILL:
            pm = PrefillModel.build(perf, self.sample)
            return max_rate(lambda r: float(pm.ttft_ok(r, self.slo.ttft_s).mean()), tgt, pm.guess_capacity_rps())
        if phase is Phase.DECODE:
            dm = DecodeModel.build(perf, self.sample, self.slo.tpot_s)
            return max_rate(lambda r: float(dm.ok(r).mean()), tgt, dm.guess_capacity_rps())
        cm = ColocatedModel.build(perf, self.sample)
        return max_rate(lambda r: float(cm.ok(r, self.slo.ttft_s, self.slo.tpot_s).mean()),
                        self.slo.attainment_target, cm.guess_capacity_rps())

    def edge_capacity(self, prefill: Stages, seconds_per_token: float) -> float:
        """Rate a prefill group can take at the SLO if all its KV goes over an edge with this link rate."""
        key = (prefill, round(seconds_per_token, 15) if math.isfinite(seconds_per_token) else math.inf)
        if key not in self._cap_edge:
            if not self.edge_usable(seconds_per_token):
                self._cap_edge[key] = 0.0
            else:
                pm = self.prefill_model(prefill)
                edge = self.edge(seconds_per_token)
                self._cap_edge[key] = max_rate(
                    lambda r: float(pm.ttft_ok(r, self.slo.ttft_s, edge, r).mean()), component_target(self.slo),
                    pm.guess_capacity_rps())
        return self._cap_edge[key]

    def decode_capacity(self, stages: Stages) -> float:
        if stages not in self._cap_decode:
            dm = self.decode_model(stages)
            self._cap_decode[stages] = max_rate(lambda r: float(dm.ok(r).mean()), component_target(self.slo),
                                                dm.guess_capacity_rps())
        return self._cap_decode[stages]

    def colocated_capacity(self, stages: Stages) -> float:
        if stages not in self._cap_colocated:
            cm = self.colocated_model(stages)
            self._cap_colocated[stages] = max_rate(
                lambda r: float(cm.ok(r, self.slo.ttft_s, self.slo.tpot_s).mean()), self.slo.attainment_target,
                cm.guess_capacity_rps())
        return self._cap_colocated[stages]

    def group_capacity(self, group: Group) -> float:
        """Stand-alone capacity of a plan group in its phase (prefill: best case, free link)."""
        if group.phase is Phase.PREFILL:
            return self.edge_capacity(group.stages, 0.0)
        if group.phase is Phase.DECODE:
            return self.decode_capacity(group.stages)
        return self.colocated_capacity(group.stages)
