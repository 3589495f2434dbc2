"""Specs: the facts ThunderServe plans for (GPUs, cluster and network, model, workload, SLO)."""

from thunderserve.spec.cluster import Cluster, ClusterSpec, GpuRef, load_cluster, resolve_cluster
from thunderserve.spec.gpu import GpuSpec, gpu_catalog, lookup_gpu
from thunderserve.spec.model import ModelSpec, load_model, model_catalog
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec, load_workload, read_trace

__all__ = [
    "Cluster", "ClusterSpec", "GpuRef", "GpuSpec", "ModelSpec", "SloSpec", "WorkloadSpec", "gpu_catalog",
    "load_cluster", "load_model", "load_workload", "lookup_gpu", "model_catalog", "read_trace",
    "resolve_cluster",
]
