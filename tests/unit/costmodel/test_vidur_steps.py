"""The step-time model against Vidur's published step times (Llama-2-7B, one A100-80GB, TP1, issue 11).

Vidur composes a step from its measured kernels; these are its figures for whole steps. The shipped catalog
(the A100 fit of Vidur's GEMM, element-wise and attention profiles) must reproduce each within 10%."""

from __future__ import annotations

import pytest

from thunderserve.costmodel.perf import StagePerf, stage_perf
from thunderserve.spec.cluster import ClusterSpec, NodeSpec, resolve_cluster
from thunderserve.spec.gpu import lookup_gpu
from thunderserve.spec.model import model_catalog

CONTEXT = 1088  # decode context of the published decode and mixed steps


def _a100_llama7b() -> StagePerf:
    gpu = lookup_gpu("A100-80GB")
    cluster = resolve_cluster(ClusterSpec(name="one", gpu_types=(gpu,),
                                          nodes=(NodeSpec(name="n", gpu=gpu.name, count=1),)), "one")
    model = model_catalog()["llama-2-7b"]
    return stage_perf(model, cluster.gpus, model.num_layers, cluster, first=True, last=True)


def test_prefill_of_1024_tokens() -> None:
    assert _a100_llama7b().prefill_time_s(1024.0, 1024.0**2) == pytest.approx(76.9e-3, rel=0.10)


@pytest.mark.parametrize(("batch", "vidur_ms"), [(1, 9.7), (32, 20.2), (96, 40.9)])
def test_decode_steps(batch: int, vidur_ms: float) -> None:
    assert _a100_llama7b().decode_time_s(batch, batch * CONTEXT) == pytest.approx(vidur_ms * 1e-3, rel=0.10)


@pytest.mark.parametrize(("decodes", "vidur_ms"), [(20, 44.1), (40, 50.2)])
def test_mixed_steps_add_their_parts(decodes: int, vidur_ms: float) -> None:
    # a ~490-token chunk (the second of a 1,024-token prompt under a 512-token budget: 512 done before it)
    chunk, done = 512 - decodes, 512
    stage = _a100_llama7b()
    t = stage.step_time_s(decodes, decodes * CONTEXT, chunk, chunk**2 + 2 * chunk * done, decodes)
    assert t == pytest.approx(vidur_ms * 1e-3, rel=0.10)
