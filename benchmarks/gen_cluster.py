"""Generate realistic heterogeneous cloud clusters of N GPUs spread over zones (for the scheduler benchmark).

A cluster mixes the GPU types one rents on secondary clouds (as in paper-cloud-32): 4-GPU PCIe nodes of
RTX-3090Ti, A40, RTX-A6000 and L40S in equal proportions at every size (secondary-cloud prices), optionally with one
8-GPU NVLink A100-80GB node per `a100_every` GPUs. Nodes are spread round-robin-ish over zones (data centres); 40 Gbps inside a zone,
5-10 Gbps between zones (a random pair gets 10), as in the paper's setting. Deterministic for a seed.

    python benchmarks/gen_cluster.py 128 --seed 0 -o cluster-128.yaml
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import yaml

from thunderserve.spec.cluster import ClusterSpec, NetworkSpec, NodeSpec, PairBandwidth

# (type, GPUs per node, price per GPU-hour, weight in the mix)
NODE_TYPES: list[tuple[str, int, float, float]] = [
    ("RTX-3090Ti", 4, 0.25, 0.25),
    ("A40", 4, 0.45, 0.25),
    ("RTX-A6000", 4, 0.55, 0.25),
    ("L40S", 4, 0.443, 0.25),
]
A100_NODE = ("A100-80GB", 8, 1.6925)
INTRA_ZONE_GBPS = 40.0
INTER_ZONE_GBPS = (5.0, 10.0)


def generate_cluster(num_gpus: int, seed: int = 0, num_zones: int | None = None, a100_every: int = 0
                     ) -> ClusterSpec:
    """A cluster of exactly `num_gpus` GPUs (multiple of 4) in `num_zones` zones (default one per 16 GPUs)."""
    if num_gpus < 4 or num_gpus % 4:
        raise ValueError("num_gpus must be a positive multiple of 4")
    rng = random.Random(seed)
    zones = num_zones or max(1, num_gpus // 16)  # ~4 nodes per zone at every size
    zone_names = [f"z{i}" for i in range(zones)]
    nodes: list[NodeSpec] = []
    left = num_gpus
    a100_nodes = num_gpus // a100_every if a100_every > 0 else 0
    for _ in range(a100_nodes):
        if left >= 8:
            name, count, price = A100_NODE
            nodes.append(NodeSpec(name=f"n{len(nodes)}", gpu=name, count=count, price_per_gpu_hour=price,
                                  zone=zone_names[len(nodes) % zones]))
            left -= count
    # equal shares of the four types at every size (each block of four nodes holds one of each, shuffled),
    # so clusters of different sizes differ in scale, not in mix
    order: list[tuple[str, int, float, float]] = []
    while len(order) * 4 < left:
        block = list(NODE_TYPES)
        rng.shuffle(block)
        order.extend(block)
    for name, count, price, _ in order[: left // 4]:
        zone = zone_names[rng.randrange(zones)] if rng.random() < 0.3 else zone_names[len(nodes) % zones]
        nodes.append(NodeSpec(name=f"n{len(nodes)}", gpu=name, count=count, price_per_gpu_hour=price, zone=zone))
    used = sorted({n.zone for n in nodes}, key=zone_names.index)
    pairs = [PairBandwidth(between=(z, z), gbps=INTRA_ZONE_GBPS) for z in used]
    for i, a in enumerate(used):
        for b in used[i + 1:]:
            pairs.append(PairBandwidth(between=(a, b), gbps=rng.choice(INTER_ZONE_GBPS)))
    return ClusterSpec(name=f"gen-{num_gpus}-s{seed}", nodes=tuple(nodes),
                       network=NetworkSpec(default_gbps=min(INTER_ZONE_GBPS), zones=tuple(pairs)))


def to_yaml(spec: ClusterSpec) -> str:
    data = spec.model_dump(mode="json", exclude_defaults=True)
    return yaml.safe_dump(data, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("num_gpus", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zones", type=int, default=None)
    parser.add_argument("--a100-every", type=int, default=0, help="one 8x A100-80GB node per this many GPUs")
    parser.add_argument("-o", "--output", type=Path, default=None)
    args = parser.parse_args(argv)
    text = to_yaml(generate_cluster(args.num_gpus, args.seed, args.zones, args.a100_every))
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
