"""The demo deployment: a synthetic two-device "local" cluster and a 1-prefill + 1-decode plan on it."""

from __future__ import annotations

from thunderserve.plan.model import Group, Phase, Plan, Routing, Stage
from thunderserve.plan.validate import validate_plan
from thunderserve.spec.cluster import Cluster, ClusterSpec, resolve_cluster
from thunderserve.spec.model import ModelSpec

LOCAL_DEVICE = {  # a CPU "device" as the cost model sees it (rough figures; only used to validate the demo)
    "name": "LOCAL-CPU", "memory_gb": 8, "fp16_tflops": 0.5, "memory_bandwidth_gbs": 20,
    "intra_node_gbs": 10, "price_usd_per_hour": 0.0,
}


def local_cluster(num_devices: int = 2) -> Cluster:
    """This machine as a one-node cluster named "local" with `num_devices` CPU devices."""
    spec = ClusterSpec.model_validate({"name": "local", "gpu_types": [LOCAL_DEVICE],
                                       "nodes": [{"name": "local", "gpu": "LOCAL-CPU", "count": num_devices}]})
    return resolve_cluster(spec, "local")


def demo_plan(model: ModelSpec) -> Plan:
    """p0 (prefill, local:0) ships KV caches to d0 (decode, local:1); validated against `local_cluster`."""
    layers = (0, model.num_layers)
    plan = Plan(model=model.name, cluster="local", groups=(
        Group(id="p0", phase=Phase.PREFILL, stages=(Stage(gpus=("local:0",), layers=layers),)),
        Group(id="d0", phase=Phase.DECODE, stages=(Stage(gpus=("local:1",), layers=layers),)),
    ), routing=Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}}))
    validate_plan(plan, local_cluster(2), model)
    return plan
