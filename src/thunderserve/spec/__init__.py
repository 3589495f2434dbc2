"""Specs: the facts ThunderServe plans for (GPUs, cluster and network, model, workload, SLO).

Names are loaded on first use (PEP 562): `spec.slo` alone does not pull in numpy (the CLI's option parsing).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thunderserve.spec.cluster import Cluster, ClusterSpec, GpuRef, load_cluster, resolve_cluster
    from thunderserve.spec.gpu import GpuSpec, gpu_catalog, lookup_gpu
    from thunderserve.spec.model import ModelSpec, load_model, model_catalog
    from thunderserve.spec.slo import SloSpec
    from thunderserve.spec.workload import WorkloadSpec, load_workload, read_trace

_WHERE = {
    "Cluster": "cluster", "ClusterSpec": "cluster", "GpuRef": "cluster", "load_cluster": "cluster",
    "resolve_cluster": "cluster", "GpuSpec": "gpu", "gpu_catalog": "gpu", "lookup_gpu": "gpu", "ModelSpec":
    "model", "load_model": "model", "model_catalog": "model", "SloSpec": "slo", "WorkloadSpec": "workload",
    "load_workload": "workload", "read_trace": "workload",
}
__all__ = [
    "Cluster", "ClusterSpec", "GpuRef", "GpuSpec", "ModelSpec", "SloSpec", "WorkloadSpec", "gpu_catalog",
    "load_cluster", "load_model", "load_workload", "lookup_gpu", "model_catalog", "read_trace",
    "resolve_cluster",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"thunderserve.spec.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'thunderserve.spec' has no attribute {name!r}")
