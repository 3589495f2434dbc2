"""Shared network capacity: which resources a transfer crosses, and how concurrent transfers share them.

Resources (each with a capacity in bytes/s, one direction): a node's NIC out and NIC in (`Cluster.nic_bytes_s`,
full duplex), a node's intra-node bus (its GPU-to-GPU link: transfers inside a node share it), the path between
two zones (the zone pair's bandwidth, or the network default where no rule is given; per direction) and an
explicit node-pair link (per direction). A transfer between two nodes crosses the source's NIC out, the
destination's NIC in, and the zone path or explicit link between them; a transfer inside a node crosses its bus.
Links between nodes of one zone are a switched fabric: only the NICs are shared there.

A transfer (`Path`) is also capped by its own path bandwidth (what it gets alone, `Cluster.bandwidth_bytes_s`),
so a lone transfer takes exactly `costmodel.kv.kv_transfer_time_s` (its streams' bytes, then the message
latency). Concurrent transfers share by max-min
fairness (`max_min_rates`, what TCP-like flows converge to; the simulator recomputes it whenever a transfer
starts or ends, `sim.network`); the planner's estimate uses per-resource utilisation instead
(`contention_slowdown`: processor sharing at the busiest resource a transfer crosses).

Not modelled: PCIe between a GPU and its NIC, switch oversubscription inside a zone, TCP slow start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from thunderserve.costmodel.comm import Compression, compression_ratio
from thunderserve.spec.cluster import GBPS_TO_BYTES, Cluster, GpuRef
from thunderserve.spec.model import ModelSpec


@dataclass(frozen=True)
class Topology:
    """The shared resources of a cluster's network, by name ("nic-out:n0", "zone:dc-a:dc-b", ...)."""

    capacity_bytes_s: Mapping[str, float]
    _nodes: tuple[str, ...]  # node names, in cluster order
    _zone: tuple[str, ...]  # per node
    _explicit: frozenset[tuple[int, int]]  # node pairs with an explicit link (both orders)

    @classmethod
    def of(cls, cluster: Cluster) -> Topology:
        spec = cluster.spec
        n = len(cluster.node_names)
        bw = cluster.node_bandwidth_bytes_s
        nic = cluster.nic_bytes_s or tuple(float(max([bw[i, j] for j in range(n) if j != i] or [0.0]))
                                           for i in range(n))
        caps: dict[str, float] = {}
        for i, node in enumerate(cluster.node_names):
            caps[f"nic-out:{node}"] = caps[f"nic-in:{node}"] = nic[i]
            caps[f"bus:{node}"] = float(bw[i, i])
        zone_of = {nd.name: nd.zone for nd in spec.nodes}
        zones = sorted(set(zone_of.values()))
        rule = {frozenset(z.between): z.gbps for z in spec.network.zones}
        for za in zones:
            for zb in zones:
                if za != zb:
                    caps[f"zone:{za}:{zb}"] = rule.get(frozenset((za, zb)), spec.network.default_gbps) * GBPS_TO_BYTES
        pos = {nm: i for i, nm in enumerate(cluster.node_names)}
        explicit: set[tuple[int, int]] = set()
        for link in spec.network.links:
            a, b = link.between
            for x, y in ((a, b), (b, a)):
                caps[f"link:{x}:{y}"] = link.gbps * GBPS_TO_BYTES
                explicit.add((pos[x], pos[y]))
        return cls(caps, cluster.node_names, tuple(zone_of.get(nm, "default") for nm in cluster.node_names),
                   frozenset(explicit))

    def crossed(self, src_nodes: Sequence[int], dst_nodes: Sequence[int]) -> tuple[str, ...]:
        """Resources a transfer from GPUs on `src_nodes` to GPUs on `dst_nodes` crosses (sorted names)."""
        out: set[str] = set()
        names, zone = self._nodes, self._zone
        for i in sorted(set(src_nodes)):
            for j in sorted(set(dst_nodes)):
                if i == j:
                    out.add(f"bus:{names[i]}")
                    continue
                out.add(f"nic-out:{names[i]}")
                out.add(f"nic-in:{names[j]}")
                if (i, j) in self._explicit:
                    out.add(f"link:{names[i]}:{names[j]}")
                elif zone[i] != zone[j]:
                    out.add(f"zone:{zone[i]}:{zone[j]}")
        return tuple(sorted(out))


@dataclass(frozen=True)
class Path:
    """One stream of a KV transfer: a prefill stage sending its layers' KV to the decode GPUs holding them."""

    resources: tuple[str, ...]  # Topology resources it crosses
    bytes_per_token: float  # compressed KV bytes per prompt token on this stream
    cap_bytes_s: float  # its speed alone (the slowest path bandwidth it uses); inf inside the same GPUs

    def nbytes(self, tokens: float) -> float:
        """Bytes to move for a prompt of `tokens` (the per-message latency, SEND_LATENCY_S, comes on top)."""
        return tokens * self.bytes_per_token


def kv_paths(model: ModelSpec, prefill_stages: Sequence[tuple[Sequence[GpuRef], int]],
             decode_gpus: Sequence[GpuRef], cluster: Cluster, topology: Topology,
             compression: Compression | str = Compression.NONE, *,
             decode_stages: Sequence[tuple[Sequence[GpuRef], int]] | None = None) -> list[Path]:
    """The streams of one request's KV transfer, as `costmodel.kv.kv_seconds_per_token` prices them: one per
    prefill stage (its layers to the decode GPUs, or with `decode_stages` to the stage holding each layer,
    per-segment); streams run in parallel and the transfer ends with the last. A stream of zero seconds (KV
    already in place) is left out; a stream over a zero-bandwidth link has cap 0."""
    per_layer = model.kv_bytes_per_token_per_layer * compression_ratio(compression, model.dtype_bytes)
    targets = [(list(decode_gpus), 0, model.num_layers)] if decode_stages is None else _ranges(decode_stages)
    out: list[Path] = []
    for gpus, lo, hi in _ranges(prefill_stages):
        seconds = nbytes = 0.0
        dst_nodes: list[int] = []
        for dst, d_lo, d_hi in targets:
            overlap = hi - lo if decode_stages is None else min(hi, d_hi) - max(lo, d_lo)
            if overlap <= 0:
                continue
            bw = cluster.min_bandwidth_bytes_s(list(gpus), dst)
            b = per_layer * overlap
            seconds += b / bw if bw > 0 else float("inf")
            nbytes += b
            dst_nodes.extend(g.node_index for g in dst)
        if nbytes <= 0:
            continue
        cap = nbytes / seconds if seconds > 0 else float("inf")
        out.append(Path(topology.crossed([g.node_index for g in gpus], dst_nodes), nbytes, cap))
    return out


def _ranges(stages: Sequence[tuple[Sequence[GpuRef], int]]) -> list[tuple[list[GpuRef], int, int]]:
    out, start = [], 0
    for gpus, layers in stages:
        out.append((list(gpus), start, start + layers))
        start += layers
    return out


def max_min_rates(resources: Sequence[Sequence[str]], caps: Sequence[float], capacity: Mapping[str, float],
                  counts: Sequence[int] | None = None) -> list[float]:
    """Max-min fair rates (bytes/s, per flow) of flows crossing `resources[f]` with own caps `caps[f]` (with
    `counts`, entry f stands for that many identical flows), by progressive filling: raise every unfrozen
    flow's rate together; a flow freezes at its cap or when a resource it crosses fills up. Deterministic."""
    n = len(caps)
    weight = counts if counts is not None else [1] * n
    rate = [0.0] * n
    left = {r: capacity[r] for f in range(n) for r in resources[f]}
    users: dict[str, int] = {}
    for f in range(n):
        for r in resources[f]:
            users[r] = users.get(r, 0) + weight[f]
    active = list(range(n))
    level = 0.0
    while active:
        step = min(caps[f] - level for f in active)
        for r, k in users.items():
            if k > 0:
                step = min(step, left[r] / k)
        step = max(step, 0.0)
        level += step
        for r, k in users.items():
            if k > 0:
                left[r] -= step * k
        still = []
        for f in active:
            full = caps[f] - level <= 1e-12 * max(caps[f], 1.0) or any(
                left[r] <= 1e-9 * max(capacity[r], 1.0) for r in resources[f])
            if full:
                rate[f] = level
                for r in resources[f]:
                    users[r] -= weight[f]
            else:
                still.append(f)
        if len(still) == len(active):  # numerical safety: nothing froze
            for f in still:
                rate[f] = level
            break
        active = still
    return rate


def alone_seconds_per_token(paths: Sequence[Path], capacity: Mapping[str, float]) -> float:
    """Seconds per prompt token of one transfer over `paths` with nothing else on the network: its streams
    still share what they have in common (two pipeline stages of one node sending through its NIC), by
    max-min fairness, in fluid phases until the last stream ends. inf when a stream has no bandwidth."""
    if any(p.cap_bytes_s <= 0 for p in paths):
        return float("inf")
    left = [p.bytes_per_token for p in paths]
    live = [i for i, b in enumerate(left) if b > 0]
    t = 0.0
    while live:
        rates = max_min_rates([paths[i].resources for i in live], [paths[i].cap_bytes_s for i in live], capacity)
        dt = min(left[i] / x for i, x in zip(live, rates, strict=True))
        t += dt
        for i, x in zip(live, rates, strict=True):
            left[i] -= x * dt
        live = [i for i in live if left[i] > 1e-12 * paths[i].bytes_per_token]
    return t


def contention_slowdown(paths: Sequence[Path], load_bytes_s: Mapping[str, float],
                        capacity: Mapping[str, float]) -> float:
    """Mean-value factor by which sharing stretches a transfer over these paths: processor sharing at each
    resource, utilisation ρ_r = offered bytes/s over capacity, so a stream of cap c through r runs at about
    C_r(1-ρ_r) when that is below c. inf when a resource it crosses is saturated (ρ_r >= 1)."""
    worst = 1.0
    for p in paths:
        for r in p.resources:
            rho = load_bytes_s.get(r, 0.0) / capacity[r]
            if rho >= 1.0:
                return float("inf")
            worst = max(worst, p.cap_bytes_s / (capacity[r] * (1.0 - rho)))
    return worst
