"""Re-scheduling events: what changed (GPUs lost or added, a new workload estimate) and when.

Text forms (CLI and simulator): `fail:NODE`, `fail:NODE:INDEX`, `add:NODE.yaml`, `workload:NAME|CSV`; the
simulator prefixes a time in seconds: `600:fail:n3`, `1200:workload:coding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from thunderserve.errors import SpecError
from thunderserve.spec._load import read_yaml
from thunderserve.spec.cluster import Cluster, ClusterSpec, NodeSpec, PairBandwidth, resolve_cluster
from thunderserve.spec.workload import WorkloadSpec, load_workload


class EventKind(StrEnum):
    FAIL = "fail"
    ADD = "add"
    WORKLOAD = "workload"


@dataclass(frozen=True)
class ReschedEvent:
    """One change to react to. Exactly one of the payload fields is set, matching `kind`."""

    kind: EventKind
    node: str | None = None  # fail: the node
    gpu_index: int | None = None  # fail: a single GPU of the node (None = the whole node)
    add_path: str | None = None  # add: YAML with one node or a list of nodes (+ optional links)
    workload: str | None = None  # workload: preset name or trace CSV
    at_s: float | None = None  # simulator only: when it happens

    def describe(self) -> str:
        if self.kind is EventKind.FAIL:
            return f"fail:{self.node}" + (f":{self.gpu_index}" if self.gpu_index is not None else "")
        if self.kind is EventKind.ADD:
            return f"add:{self.add_path}"
        return f"workload:{self.workload}"


def parse_event(text: str, *, timed: bool = False) -> ReschedEvent:
    """Parse `fail:n3`, `fail:n3:2`, `add:x.yaml`, `workload:coding` (with a `T:` prefix when timed)."""
    raw = text
    at_s: float | None = None
    if timed:
        head, _, text = text.partition(":")
        try:
            at_s = float(head)
        except ValueError:
            raise SpecError(f"expected TIME:EVENT (e.g. 600:fail:n3), got '{raw}'", field="--event") from None
        if at_s < 0:
            raise SpecError(f"event time must be >= 0, got '{raw}'", field="--event")
    kind, _, rest = text.partition(":")
    if kind == "fail" and rest:
        node, _, idx = rest.partition(":")
        if idx and not idx.isdigit():
            raise SpecError(f"GPU index must be an integer in '{raw}'", field="--event")
        return ReschedEvent(EventKind.FAIL, node=node, gpu_index=int(idx) if idx else None, at_s=at_s)
    if kind == "add" and rest:
        return ReschedEvent(EventKind.ADD, add_path=rest, at_s=at_s)
    if kind == "workload" and rest:
        return ReschedEvent(EventKind.WORKLOAD, workload=rest, at_s=at_s)
    raise SpecError(f"unknown event '{raw}' (expected fail:NODE[:INDEX], add:NODE.yaml or workload:NAME|CSV)",
                    field="--event")


def failed_gpus(cluster: Cluster, event: ReschedEvent) -> set[str]:
    """GPU ids an event removes; unknown node or index is an error naming it."""
    if event.node not in cluster.node_names:
        raise SpecError(f"unknown node '{event.node}' in cluster {cluster.name}", field="--event")
    ids = {g.id for g in cluster.gpus if g.node == event.node}
    if event.gpu_index is not None:
        gid = f"{event.node}:{event.gpu_index}"
        if gid not in ids:
            raise SpecError(f"unknown GPU '{gid}' in cluster {cluster.name}", field="--event")
        return {gid}
    return ids


def cluster_without(cluster: Cluster, gpu_ids: set[str]) -> Cluster:
    """The same cluster with some GPUs gone (ids of the others unchanged; links unchanged)."""
    return Cluster(spec=cluster.spec, gpus=tuple(g for g in cluster.gpus if g.id not in gpu_ids),
                   node_names=cluster.node_names, node_bandwidth_bytes_s=cluster.node_bandwidth_bytes_s,
                   nic_bytes_s=cluster.nic_bytes_s)


def cluster_with_added(cluster: Cluster, path: str) -> Cluster:
    """The cluster plus the nodes (and links) in a YAML: `{name, gpu, count, ...}`, a list, or `{nodes, links}`."""
    data = read_yaml(Path(path))
    if isinstance(data, dict) and "nodes" in data:
        nodes, links = data.get("nodes") or [], data.get("links") or []
    else:
        nodes, links = (data if isinstance(data, list) else [data]), []
    try:
        new_nodes = tuple(NodeSpec.model_validate(n) for n in nodes)
        new_links = tuple(PairBandwidth.model_validate(link) for link in links)
    except Exception as exc:  # pydantic ValidationError: name the file, keep one line
        raise SpecError(str(exc).splitlines()[0], source=path) from None
    spec = cluster.spec
    merged = ClusterSpec(name=spec.name, gpu_types=spec.gpu_types, nodes=spec.nodes + new_nodes,
                         network=spec.network.model_copy(update={"links": spec.network.links + new_links}))
    try:
        grown = resolve_cluster(ClusterSpec.model_validate(merged.model_dump()), path)
    except ValueError as exc:
        raise SpecError(str(exc).splitlines()[-1].strip(), source=path) from None
    gone = {g.id for g in resolve_cluster(spec).gpus} - {g.id for g in cluster.gpus}
    return cluster_without(grown, gone)


def event_workload(event: ReschedEvent) -> WorkloadSpec:
    assert event.workload is not None
    return load_workload(event.workload)
