"""Default SLOs: TPOT from DistServe's published targets, TTFT 5x the reference latency, scales keep meaning."""

from __future__ import annotations

import pytest

from thunderserve.costmodel.reference import (
    application_of,
    published_tpot_ms,
    reference_latency_s,
    slo_from_scale,
)
from thunderserve.spec import load_model, load_workload


def test_workloads_map_to_distserve_applications_by_name() -> None:
    assert application_of("conversation") == "chatbot"
    assert application_of("coding") == "code_completion"
    assert application_of("arxiv-summarization") == "summarisation"
    assert application_of("my-trace") is None


def test_published_tpot_by_application_and_model_size() -> None:
    llama30 = load_model("llama-30b")  # 32.5B parameters: the 13B-66B chatbot anchor
    assert published_tpot_ms(llama30, "conversation") == 100.0
    assert published_tpot_ms(llama30, "coding") == 200.0
    assert published_tpot_ms(llama30, "summarization") == 150.0
    small = load_model("llama-2-7b")  # below the smallest anchor: its target
    assert published_tpot_ms(small, "conversation") == 100.0
    big = load_model("llama-2-70b")  # just past 66B: log-linear toward 175B's 200 ms
    assert 100.0 < published_tpot_ms(big, "conversation") < 110.0  # type: ignore[operator]
    assert published_tpot_ms(llama30, "my-trace") is None


def test_default_slo_is_published_tpot_and_5x_reference_ttft_and_scales_multiply_both() -> None:
    model, workload = load_model("llama-30b"), load_workload("conversation")
    ttft_ref, _ = reference_latency_s(model, workload.mean_prompt_tokens, workload.mean_output_tokens)
    slo = slo_from_scale(model, workload, 5.0)
    assert slo.tpot_ms == pytest.approx(100.0)
    assert slo.ttft_ms == pytest.approx(5 * ttft_ref * 1e3)
    half = slo_from_scale(model, workload, 2.5)
    assert half.tpot_ms == pytest.approx(50.0) and half.ttft_ms == pytest.approx(slo.ttft_ms / 2)
