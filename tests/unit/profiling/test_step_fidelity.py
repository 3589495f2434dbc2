"""Step-level fidelity of the shipped calibration: per kind of step, A100 (in the fit) and H100 (not in it)."""

from __future__ import annotations

import pytest

from thunderserve.costmodel.calibration import default_calibration
from thunderserve.profiling.step_fidelity import step_fidelity, vidur_published_steps
from thunderserve.profiling.vidur import discover, packaged_profiles_dir
from thunderserve.profiling.vidur_ops import read_op_terms


@pytest.fixture(scope="module")
def report():  # type: ignore[no-untyped-def]
    terms = read_op_terms(discover(packaged_profiles_dir()), fit_gpus=[])
    return step_fidelity(default_calibration(), terms.layer_ops, terms.attention_profiles)


@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
def test_a100_steps_with_measured_attention_within_ten_percent(report, kind: str) -> None:  # type: ignore[no-untyped-def]
    a100 = report["A100-80GB"]
    assert a100["attention"] == "measured"
    assert a100[kind]["num_points"] > 300
    assert a100[kind]["median_relative_error"] < 0.10


@pytest.mark.parametrize("kind", ["prefill", "decode", "mixed"])
def test_unseen_h100_steps_within_fifteen_percent(report, kind: str) -> None:  # type: ignore[no-untyped-def]
    h100 = report["H100-SXM"]
    assert h100["attention"] == "not profiled"  # no H100 attention profile ships: said, not invented
    assert h100[kind]["median_relative_error"] < 0.15


def test_vidur_published_steps_within_ten_percent() -> None:
    rows = vidur_published_steps(default_calibration())
    assert {r["kind"] for r in rows} == {"prefill", "decode", "mixed"}
    for r in rows:
        assert abs(r["ratio"] - 1.0) < 0.10, r
