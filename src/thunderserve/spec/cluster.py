"""Clusters: nodes of GPUs and the network between them.

`ClusterSpec` is the YAML contract (facts as written by the user); `Cluster` is the resolved view every
subsystem uses: a flat, ordered list of GPUs ("<node>:<index>") with their type and price, and the bandwidth
between any two GPUs in bytes/s (intra-node link, or the most specific network rule: node-pair link, zone
pair, default).

Shared capacities (`costmodel.network`): each node's NIC (`NodeSpec.nic_gbps`), each inter-zone path (the zone
pair's bandwidth, or the default between zones without a rule) and each explicit node-pair link are resources
that concurrent transfers crossing them share.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from thunderserve.errors import SpecError
from thunderserve.spec._load import read_yaml, validate_as
from thunderserve.spec.gpu import GpuSpec, lookup_gpu

GBPS_TO_BYTES = 1e9 / 8  # network figures are gigabits per second
GBS_TO_BYTES = 1e9  # intra-node figures are gigabytes per second


class NodeSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    gpu: str  # GPU type name from the catalog or the cluster's gpu_types
    count: int = Field(gt=0)  # GPUs in this node
    price_per_gpu_hour: float | None = Field(default=None, ge=0)  # overrides the catalog price
    zone: str = "default"
    intra_node_gbs: float | None = Field(default=None, gt=0)  # overrides the GPU type's intra-node link, GB/s
    # the node's network interface, gigabits per second in each direction (full duplex), shared by every
    # transfer into (or out of) the node; None: the fastest inter-node bandwidth the network section gives
    # this node (so one transfer alone runs at its path's bandwidth, as before this field existed)
    nic_gbps: float | None = Field(default=None, gt=0)

    @field_validator("name")
    @classmethod
    def _no_colon(cls, v: str) -> str:
        if ":" in v:
            raise ValueError("node names cannot contain ':'")
        return v


class PairBandwidth(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    between: tuple[str, str]  # two zone names (zones) or two node names (links); symmetric
    gbps: float = Field(ge=0)  # gigabits per second; 0 means no usable link


class NetworkSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    default_gbps: float = Field(default=10.0, gt=0)  # between nodes when nothing more specific is given
    zones: tuple[PairBandwidth, ...] = ()
    links: tuple[PairBandwidth, ...] = ()


class ClusterSpec(BaseModel):
    """The cluster YAML contract."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "cluster"
    gpu_types: tuple[GpuSpec, ...] = ()
    nodes: tuple[NodeSpec, ...] = Field(min_length=1)
    network: NetworkSpec = NetworkSpec()

    @model_validator(mode="after")
    def _check_names(self) -> ClusterSpec:
        seen: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.name in seen:
                raise ValueError(f"duplicate node name '{node.name}' (nodes.{i}.name)")
            seen.add(node.name)
        zones = {n.zone for n in self.nodes}
        for i, z in enumerate(self.network.zones):
            for name in z.between:
                if name not in zones:
                    raise ValueError(f"network.zones.{i}: unknown zone '{name}'")
        for i, link in enumerate(self.network.links):
            for name in link.between:
                if name not in seen:
                    raise ValueError(f"network.links.{i}: unknown node '{name}'")
        return self


@dataclass(frozen=True)
class GpuRef:
    """One physical GPU of a cluster."""

    id: str  # "<node>:<index>"
    node: str
    index: int
    spec: GpuSpec
    price_usd_per_hour: float
    zone: str
    node_index: int  # position of the node in the cluster


@dataclass(frozen=True)
class Cluster:
    """Resolved cluster: ordered GPUs and pairwise bandwidth."""

    spec: ClusterSpec
    gpus: tuple[GpuRef, ...]
    node_names: tuple[str, ...]
    node_bandwidth_bytes_s: np.ndarray  # [num_nodes, num_nodes]; diagonal = intra-node link
    nic_bytes_s: tuple[float, ...] = ()  # per node: its NIC's capacity in each direction (see NodeSpec.nic_gbps)

    @property
    def name(self) -> str:
        return self.spec.name

    @cached_property
    def by_id(self) -> dict[str, GpuRef]:
        return {g.id: g for g in self.gpus}

    @cached_property
    def index_of(self) -> dict[str, int]:
        return {g.id: i for i, g in enumerate(self.gpus)}

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    @property
    def cost_usd_per_hour(self) -> float:
        return float(sum(g.price_usd_per_hour for g in self.gpus))

    def bandwidth_bytes_s(self, a: GpuRef, b: GpuRef) -> float:
        """Bandwidth between two GPUs (intra-node link when on the same node)."""
        return float(self.node_bandwidth_bytes_s[a.node_index, b.node_index])

    def min_bandwidth_bytes_s(self, group_a: list[GpuRef], group_b: list[GpuRef]) -> float:
        """Slowest link between any GPU of one set and any of another (inf for empty sets)."""
        na = sorted({g.node_index for g in group_a})
        nb = sorted({g.node_index for g in group_b})
        if not na or not nb:
            return float("inf")
        return float(self.node_bandwidth_bytes_s[np.ix_(na, nb)].min())

    def gpu_types(self) -> list[str]:
        return sorted({g.spec.name for g in self.gpus})


def resolve_cluster(spec: ClusterSpec, source: str = "cluster") -> Cluster:
    """Turn the YAML contract into the resolved view (GPU types looked up, bandwidth matrix built)."""
    extra = {g.name.lower(): g for g in spec.gpu_types}
    gpus: list[GpuRef] = []
    zone_of = {n.name: n.zone for n in spec.nodes}
    intra: list[float] = []
    for ni, node in enumerate(spec.nodes):
        gspec = lookup_gpu(node.gpu, extra, source=source, field=f"nodes.{ni}.gpu")
        price = node.price_per_gpu_hour if node.price_per_gpu_hour is not None else gspec.price_usd_per_hour
        for k in range(node.count):
            gpus.append(GpuRef(f"{node.name}:{k}", node.name, k, gspec, price, node.zone, ni))
        intra.append((node.intra_node_gbs or gspec.intra_node_gbs) * GBS_TO_BYTES)
    n = len(spec.nodes)
    bw = np.full((n, n), spec.network.default_gbps * GBPS_TO_BYTES)
    names = [nd.name for nd in spec.nodes]
    pos = {nm: i for i, nm in enumerate(names)}
    for z in spec.network.zones:
        za, zb = z.between
        for i in range(n):
            for j in range(n):
                zi, zj = zone_of[names[i]], zone_of[names[j]]
                if (zi, zj) in ((za, zb), (zb, za)):
                    bw[i, j] = z.gbps * GBPS_TO_BYTES
    for link in spec.network.links:
        i, j = pos[link.between[0]], pos[link.between[1]]
        bw[i, j] = bw[j, i] = link.gbps * GBPS_TO_BYTES
    for i in range(n):
        bw[i, i] = intra[i]
    bw.setflags(write=False)
    nic = []
    for i, node in enumerate(spec.nodes):
        others = [float(bw[i, j]) for j in range(n) if j != i]
        fastest = max(others) if others else spec.network.default_gbps * GBPS_TO_BYTES
        nic.append(node.nic_gbps * GBPS_TO_BYTES if node.nic_gbps is not None else fastest)
    return Cluster(spec=spec, gpus=tuple(gpus), node_names=tuple(names), node_bandwidth_bytes_s=bw,
                   nic_bytes_s=tuple(nic))


def builtin_clusters() -> list[str]:
    folder = resources.files("thunderserve.spec").joinpath("catalog/clusters")
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_cluster(ref: str) -> Cluster:
    """A built-in scenario name or a path to a cluster YAML."""
    if ref in builtin_clusters():
        res = resources.files("thunderserve.spec").joinpath(f"catalog/clusters/{ref}.yaml")
        import yaml

        data = yaml.safe_load(res.read_text())
        return resolve_cluster(validate_as(ClusterSpec, data, ref), ref)
    path = Path(ref)
    if not path.exists():
        known = ", ".join(builtin_clusters())
        raise SpecError(f"no such file or built-in cluster (built-in: {known})", source=ref)
    spec = validate_as(ClusterSpec, read_yaml(path), str(path))
    return resolve_cluster(spec, str(path))
