"""One planning problem (cluster, model, workload sample, SLO, compression) with its memo tables.

Everything the search scores is cached here by value: layouts per (GPU set, phase), queueing models per
layout, KV link rates per (prefill layout, decode GPU set), and the per-group capacities the routing LP
uses. A move of the tabu search changes one or two groups, so almost every lookup of the next candidate
is a cache hit. The context is created per call of a public function (no global state).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from thunderserve.costmodel.comm import Compression
from thunderserve.costmodel.kv import codec_seconds_per_token, kv_seconds_per_token
from thunderserve.costmodel.network import Path, Topology, kv_paths
from thunderserve.costmodel.perf import GroupPerf, group_perf
from thunderserve.plan.model import Group, Phase, Stage
from thunderserve.policy.batching import DEFAULT_CHUNK_TOKEN_BUDGET, DEFAULT_MAX_BATCH_SIZE
from thunderserve.scheduler.layout import LayoutCandidate, best_layout_candidate
from thunderserve.scheduler.perfvec import decode_step_s, mixed_step_s, prefill_times_s
from thunderserve.scheduler.queueing import ColocatedModel, DecodeModel, EdgeModel, PrefillModel, max_rate
from thunderserve.scheduler.samples import LengthSample, length_sample
from thunderserve.scheduler.shapes import GroupShape, LayoutSig, Shapes
from thunderserve.spec.cluster import Cluster, GpuRef
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

Stages = tuple[Stage, ...]
Sig = LayoutSig
CAPACITY_REL_TOL = 5e-3  # bisection tolerance of the per-group capacities the LP and the layout ranking use
Shape = tuple[tuple[int, int], ...]  # (node index, GPUs of that node) of a GPU set, sorted


def gpu_shape(cluster: Cluster, gpu_ids: Iterable[str]) -> Shape:
    """The node-level footprint of a GPU set (what KV link bandwidths depend on)."""
    return tuple(sorted(Counter(cluster.by_id[g].node_index for g in gpu_ids).items()))


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
    topology: Topology = field(init=False, repr=False)
    shapes: Shapes = field(init=False, repr=False)
    _layouts: dict[tuple[GroupShape, Phase], LayoutCandidate | None] = field(default_factory=dict, init=False,
                                                                             repr=False)
    _perf: dict[Sig, GroupPerf] = field(default_factory=dict, init=False, repr=False)
    _prefill: dict[Sig, PrefillModel] = field(default_factory=dict, init=False, repr=False)
    _decode: dict[Sig, DecodeModel] = field(default_factory=dict, init=False, repr=False)
    _colocated: dict[Sig, ColocatedModel] = field(default_factory=dict, init=False, repr=False)
    _spt: dict[tuple[tuple[tuple[Shape, int], ...], tuple[tuple[Shape, int], ...]], float] = field(
        default_factory=dict, init=False, repr=False)
    _paths: dict[object, list[Path]] = field(default_factory=dict, init=False, repr=False)
    _edges: dict[float, EdgeModel] = field(default_factory=dict, init=False, repr=False)
    _cap_prefill: dict[tuple[Sig, float, float, float], float] = field(default_factory=dict, init=False, repr=False)
    _cap_decode: dict[tuple[Sig, float, float, float], float] = field(default_factory=dict, init=False, repr=False)
    _cap_colocated: dict[tuple[Sig, float, float], float] = field(default_factory=dict, init=False, repr=False)
    _cap_standalone: dict[tuple[Sig, Phase], float] = field(default_factory=dict, init=False, repr=False)
    _sig: dict[Stages, Sig] = field(default_factory=dict, init=False, repr=False)
    _layout_memo: dict[object, object] = field(default_factory=dict, init=False, repr=False)

    _prefix_per_step: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sample = length_sample(self.workload)
        self.shapes = Shapes(self.cluster)
        self.topology = Topology.of(self.cluster)

    def sig(self, stages: Stages) -> Sig:
        if stages not in self._sig:
            self._sig[stages] = self.shapes.layout_sig(stages)
        return self._sig[stages]

    # ------------------------------------------------------------ layouts and models

    def layout(self, gpu_ids: frozenset[str], phase: Phase) -> LayoutCandidate | None:
        """Best layout of a GPU set for a phase, ranked by that phase's capacity (memoised by shape)."""
        key = (self.shapes.group_shape(gpu_ids), phase)
        if key not in self._layouts:
            found = best_layout_candidate(
                sorted(gpu_ids, key=self.cluster.index_of.__getitem__), self.cluster, self.model, self.max_pp,
                phase, score=lambda perf, st: self._standalone(perf, st, phase), proxy=self._proxy(phase),
                memo=self._layout_memo)
            self._layouts[key] = found
            if found is not None:
                self._perf.setdefault(self.sig(found.stages), found.perf)
        found = self._layouts[key]
        if found is None:
            return None
        if frozenset(g for s in found.stages for g in s.gpus) == gpu_ids:
            return found
        return LayoutCandidate(self.shapes.relabel(found.stages, gpu_ids), found.perf)

    def _proxy(self, phase: Phase) -> Callable[[GroupPerf], float]:
        """Workload-aware throughput proxies that pre-rank layouts before the exact capacity is computed.

        prefill: prompts per second through the bottleneck stage, 0 if the p90 prompt alone misses the TTFT;
        decode: tokens per second at the batch the KV memory holds; colocated: requests per second when a
        step carries that batch plus a prefill chunk (the slower of prefill and decode progress), 0 if the
        p90 prompt's chunks alone miss the TTFT.
        """
        smp = self.sample
        ep, em = smp.mean_prompt_tokens, max(smp.mean_decode_steps, 1e-9)
        ptw, cbar, reserve = smp.token_weighted_prompt_tokens, smp.decode_context_tokens, smp.decode_held_tokens
        p90 = float(np.quantile(smp.prompt_tokens, 0.9))
        ttft = self.slo.ttft_s

        def batch(perf: GroupPerf) -> float:
            return float(min(DEFAULT_MAX_BATCH_SIZE, max(perf.kv_capacity_tokens / max(reserve, 1.0), 1.0)))

        def prefill(perf: GroupPerf) -> float:
            lat, bottleneck = prefill_times_s(perf, np.array([ep, p90]), np.array([ep * ptw, p90 * p90]), 1.0)
            return 0.0 if lat[1] > ttft else float(1.0 / bottleneck[0])

        def decode(perf: GroupPerf) -> float:
            n = batch(perf)
            return n / float(decode_step_s(perf, n, n * cbar))

        def colocated(perf: GroupPerf) -> float:
            chunk = float(DEFAULT_CHUNK_TOKEN_BUDGET)
            n = min(batch(perf), chunk / 2)
            c = chunk - n
            step = float(mixed_step_s(perf, n, n * cbar, c, c * ptw, 0.0, c / ep, 1.0 + c / ep))
            alone = float(mixed_step_s(perf, 0.0, 0.0, chunk, chunk * ptw, 0.0, chunk / ep, 1.0 + chunk / ep))
            if math.ceil(p90 / chunk) * alone > ttft:
                return 0.0
            return 1.0 / (step * max(ep / c, em / n))

        return {Phase.PREFILL: prefill, Phase.DECODE: decode, Phase.COLOCATED: colocated}[phase]

    def perf(self, stages: Stages) -> GroupPerf:
        sig = self.sig(stages)
        if sig not in self._perf:
            self._perf[sig] = group_perf(
                self.model, [([self.cluster.by_id[g] for g in s.gpus], s.num_layers) for s in stages], self.cluster)
        return self._perf[sig]

    def prefill_model(self, stages: Stages) -> PrefillModel:
        sig = self.sig(stages)
        if sig not in self._prefill:
            self._prefill[sig] = PrefillModel.build(self.perf(stages), self.sample,
                                                    quantise_s_per_token=self.codec_s_per_token(stages))
        return self._prefill[sig]

    def decode_model(self, stages: Stages) -> DecodeModel:
        sig = self.sig(stages)
        if sig not in self._decode:
            self._decode[sig] = DecodeModel.build(self.perf(stages), self.sample, self.slo.tpot_s)
        return self._decode[sig]

    def colocated_model(self, stages: Stages) -> ColocatedModel:
        sig = self.sig(stages)
        if sig not in self._colocated:
            if self._prefix_per_step is None:
                self._prefix_per_step = ColocatedModel.prefix_per_step(self.sample)
            self._colocated[sig] = ColocatedModel.build(self.perf(stages), self.sample,
                                                        prefix_per_step=self._prefix_per_step)
        return self._colocated[sig]

    def seconds_per_token(self, prefill: Stages, decode: Stages) -> float:
        """KV transfer seconds per prompt token from a prefill layout to a decode layout (compressed). Each
        layer's KV goes to the decode stage holding it (per-segment transfer, as the simulator moves it: a
        pipeline whose prefill and decode segments of the same layers share a node keeps its KV inside it)."""
        key = (tuple((gpu_shape(self.cluster, s.gpus), s.num_layers) for s in prefill),
               tuple((gpu_shape(self.cluster, s.gpus), s.num_layers) for s in decode))
        if key not in self._spt:
            refs = self._stage_refs(decode)
            self._spt[key] = kv_seconds_per_token(self.model, self._stage_refs(prefill), [g for gs, _ in refs for g in gs],
                                                  self.cluster, self.compression, decode_stages=refs)
        return self._spt[key]

    def _stage_refs(self, stages: Stages) -> list[tuple[list[GpuRef], int]]:
        by_id = self.cluster.by_id
        return [([by_id[g] for g in sorted(s.gpus)], s.num_layers) for s in stages]

    def codec_s_per_token(self, stages: Stages) -> float:
        """GPU seconds per prompt token to quantise (or dequantise) a group's KV at the plan's compression."""
        by_id = self.cluster.by_id
        return codec_seconds_per_token(self.model, [([by_id[g] for g in s.gpus], s.num_layers) for s in stages],
                                       self.compression)

    def kv_paths(self, prefill: Stages, decode: Stages) -> list[Path]:
        """The streams of a KV transfer (per segment, as `seconds_per_token`) and the network resources they
        cross (`costmodel.network`). Not keyed by shape: which NIC or zone path a transfer crosses depends on
        the actual nodes."""
        key = (tuple((tuple(sorted(s.gpus)), s.num_layers) for s in prefill),
               tuple((tuple(sorted(s.gpus)), s.num_layers) for s in decode))
        if key not in self._paths:
            refs = self._stage_refs(decode)
            self._paths[key] = kv_paths(self.model, self._stage_refs(prefill), [g for gs, _ in refs for g in gs],
                                        self.cluster, self.topology, self.compression, decode_stages=refs)
        return self._paths[key]

    def edge(self, seconds_per_token: float) -> EdgeModel:
        key = _rate_key(seconds_per_token)
        if key not in self._edges:
            self._edges[key] = EdgeModel.build(seconds_per_token, self.sample)
        return self._edges[key]

    def edge_usable(self, seconds_per_token: float) -> bool:
        """An edge is unusable when the KV transfer of a mean prompt alone would blow the TTFT budget."""
        e = self.edge(seconds_per_token)
        return e.usable and e.mean_s < self.slo.ttft_s

    # ------------------------------------------------------------ capacities (req/s at the SLO)

    def _standalone(self, perf: GroupPerf, stages: Stages, phase: Phase) -> float:
        key = (self.sig(stages), phase)
        if key not in self._cap_standalone:
            self._perf.setdefault(key[0], perf)
            self._cap_standalone[key] = self.group_capacity(Group(id="x", phase=phase, stages=stages))
        return self._cap_standalone[key]

    def standalone_capacity(self, stages: Stages, phase: Phase) -> float:
        """Capacity of a layout in isolation (KV over an ideal link), used to rank layouts."""
        return self._standalone(self.perf(stages), stages, phase)

    def prefill_capacity(self, prefill: Stages, seconds_per_token: float, arrival_scv: float = 1.0,
                         target: float | None = None) -> float:
        """Rate a prefill group takes at its share of the SLO (TTFT, and KV memory held until the transfer
        ends) when all its KV crosses a link of this rate and its arrivals have this c². `target`: the
        attainment it must reach (default `component_target`: its share of the SLO's)."""
        target = component_target(self.slo) if target is None else target
        key = (self.sig(prefill), _rate_key(seconds_per_token), arrival_scv, target)
        if key not in self._cap_prefill:
            if not self.edge_usable(seconds_per_token):
                self._cap_prefill[key] = 0.0
            else:
                pm = self.prefill_model(prefill)
                edge = self.edge(seconds_per_token)
                ttft = self.slo.ttft_s

                def att(r: float) -> float:
                    hold = pm.kv_hold_ok(r, [(1.0, edge.sojourn_s(r))])
                    return hold * float(pm.ttft_ok(r, ttft, arrival_scv).mean())

                self._cap_prefill[key] = max_rate(att, target, pm.guess_capacity_rps(), CAPACITY_REL_TOL)
        return self._cap_prefill[key]

    def decode_capacity(self, stages: Stages, seconds_per_token: float = 0.0, arrival_scv: float = 1.0,
                        target: float | None = None) -> float:
        """Rate a decode group takes at its share of the SLO (TPOT including the KV link's sojourn, KV
        memory and batch slots) when all its requests arrive over a link of this rate, with this c²
        (`target` as for `prefill_capacity`)."""
        target = component_target(self.slo) if target is None else target
        key = (self.sig(stages), _rate_key(seconds_per_token), arrival_scv, target)
        if key not in self._cap_decode:
            if not self.edge_usable(seconds_per_token):
                self._cap_decode[key] = 0.0
            else:
                dm = self.decode_model(stages)
                edge = self.edge(seconds_per_token)

                def att(r: float) -> float:
                    soj = edge.sojourn_s(r)
                    mean_soj = float(soj[dm.has_decode].mean()) if dm.has_decode.any() else 0.0
                    return float(dm.ok(r, soj, mean_soj, arrival_scv).mean())

                self._cap_decode[key] = max_rate(att, target, dm.guess_capacity_rps(), CAPACITY_REL_TOL)
        return self._cap_decode[key]

    def colocated_capacity(self, stages: Stages, arrival_scv: float = 1.0, target: float | None = None) -> float:
        """Rate a colocated group takes with `target` of its requests meeting the SLO (default: the SLO's
        attainment target)."""
        target = self.slo.attainment_target if target is None else target
        key = (self.sig(stages), arrival_scv, target)
        if key not in self._cap_colocated:
            cm = self.colocated_model(stages)
            self._cap_colocated[key] = max_rate(
                lambda r: float(cm.ok(r, self.slo.ttft_s, self.slo.tpot_s, arrival_scv).mean()),
                target, cm.guess_capacity_rps(), CAPACITY_REL_TOL)
        return self._cap_colocated[key]

    def group_capacity(self, group: Group) -> float:
        """Stand-alone capacity of a plan group in its phase (disaggregated phases: over an ideal KV link)."""
        if group.phase is Phase.PREFILL:
            return self.prefill_capacity(group.stages, 0.0)
        if group.phase is Phase.DECODE:
            return self.decode_capacity(group.stages, 0.0)
        return self.colocated_capacity(group.stages)


def scv_bucket(share: float) -> float:
    """The arrival c² a round-robin share gives (c² ≈ share), rounded to a power of two for caching."""
    if share >= 0.75:
        return 1.0
    return 2.0 ** -min(round(-math.log2(max(share, 1e-9))), 6)


def _rate_key(seconds_per_token: float) -> float:
    return round(seconds_per_token, 15) if math.isfinite(seconds_per_token) else math.inf
