"""Baseline planners on the same GPUs: vLLM, DistServe and HexGen, each its strongest honest version.

`BASELINES[name](cluster, model, workload, slo) -> Plan`; each module's docstring says what it models and
what it leaves out. All plans run in the same simulator as ThunderServe's.
"""

from __future__ import annotations

from collections.abc import Callable

from thunderserve.plan import Plan
from thunderserve.scheduler.baselines.distserve import plan_distserve
from thunderserve.scheduler.baselines.hexgen import plan_hexgen
from thunderserve.scheduler.baselines.vllm import plan_vllm
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec
from thunderserve.spec.workload import WorkloadSpec

BaselineFn = Callable[[Cluster, ModelSpec, WorkloadSpec, SloSpec], Plan]

BASELINES: dict[str, BaselineFn] = {
    "vllm": plan_vllm,
    "distserve": plan_distserve,
    "hexgen": plan_hexgen,
}

__all__ = ["BASELINES", "BaselineFn", "plan_distserve", "plan_hexgen", "plan_vllm"]
