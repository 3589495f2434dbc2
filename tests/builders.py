"""Test builders: small clusters, models and plans made in one call (no sprawling fixtures)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from thunderserve.plan import Group, Phase, Plan, Routing, Stage
from thunderserve.spec import ClusterSpec, ModelSpec, resolve_cluster
from thunderserve.spec.cluster import Cluster, NetworkSpec, NodeSpec

TOY_GPU: dict[str, Any] = {
    "name": "TOY", "memory_gb": 40, "fp16_tflops": 100, "memory_bandwidth_gbs": 1000, "intra_node_gbs": 100,
    "price_usd_per_hour": 1.0, "compute_efficiency": 0.5, "memory_efficiency": 1.0, "layer_overhead_us": 0.0,
    # per-operation terms kept round: attention at the GEMMs' efficiencies, no fixed costs, no padding
    "attention_prefill_efficiency": 0.5, "attention_pad_tokens": 0.0, "attention_prefill_overhead_us": 0.0,
    "attention_decode_memory_efficiency": 1.0, "attention_decode_overhead_us": 0.0,
    "elementwise_memory_efficiency": 1.0,
}


def make_model(**overrides: Any) -> ModelSpec:
    """A small Llama-shaped model with round numbers (2 layers, hidden 1024)."""
    fields: dict[str, Any] = dict(name="toy", num_layers=2, hidden_size=1024, num_heads=8, num_kv_heads=8,
                                  intermediate_size=4096, vocab_size=1000, max_context_tokens=8192)
    fields.update(overrides)
    return ModelSpec(**fields)


def make_cluster(nodes: Sequence[tuple[str, str, int]] = (("n0", "TOY", 2),), default_gbps: float = 10.0,
                 gpu_types: Sequence[dict[str, Any]] = (TOY_GPU,), **network: Any) -> Cluster:
    """nodes: (name, gpu type, count) triples; zones default to one per node."""
    spec = ClusterSpec.model_validate({
        "name": "test",
        "gpu_types": list(gpu_types),
        "nodes": [NodeSpec(name=n, gpu=g, count=c, zone=n).model_dump() for n, g, c in nodes],
        "network": NetworkSpec.model_validate({"default_gbps": default_gbps, **network}).model_dump(),
    })
    return resolve_cluster(spec)


def make_plan(groups: Sequence[tuple[str, str, Sequence[Sequence[str]], Sequence[int]]], model: str = "toy",
              entry: dict[str, float] | None = None, kv: dict[str, dict[str, float]] | None = None,
              compression: str = "none") -> Plan:
    """groups: (id, phase, [gpus per stage], layer boundaries [0, ..., L]) tuples."""
    built = []
    for gid, phase, stages, bounds in groups:
        built.append(Group(id=gid, phase=Phase(phase), stages=tuple(
            Stage(gpus=tuple(g), layers=(bounds[i], bounds[i + 1])) for i, g in enumerate(stages))))
    routing = Routing(entry=entry, kv=kv or {}) if entry is not None else None
    return Plan(model=model, cluster="test", groups=tuple(built), routing=routing,
                kv_transfer={"compression": compression})
