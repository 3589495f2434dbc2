"""The KV quality gate: thresholds, verdicts from stored or given results, what `auto` may choose, plan stamps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from thunderserve.errors import SpecError
from thunderserve.plan import Plan, plan_from_dict
from thunderserve.quality.gate import (
    GATE,
    allowed_levels,
    choose_level,
    gate_line,
    gate_verdict,
    load_results,
    parse_results,
    stamp_plan,
    stored_results,
)


def results(int8: tuple[float, float] = (0.001, 0.998), int4: tuple[float, float] = (0.03, 0.97)) -> Any:
    doc = {"levels": {"none": {"perplexity_delta_rel": 0.0, "teacher_forced_agreement": 1.0},
                      "int8": {"perplexity_delta_rel": int8[0], "teacher_forced_agreement": int8[1]},
                      "int4": {"perplexity_delta_rel": int4[0], "teacher_forced_agreement": int4[1]}}}
    return parse_results(doc, "test.json")


def test_thresholds_are_ppl_plus_one_percent_and_agreement_099() -> None:
    assert GATE.max_perplexity_delta_rel == 0.01 and GATE.min_teacher_forced_agreement == 0.99
    assert GATE.passes(0.01, 0.99) and GATE.passes(-0.02, 1.0)
    assert not GATE.passes(0.0101, 1.0) and not GATE.passes(0.0, 0.9899)
    assert "+1%" in GATE.describe() and "0.99" in GATE.describe()


def test_auto_picks_the_most_compressed_passing_level() -> None:
    failing = results()
    assert allowed_levels("m", failing) == ["none", "int8"]
    assert choose_level("auto", "m", failing).level == "int8"
    passing = results(int4=(0.004, 0.995))
    assert allowed_levels("m", passing) == ["none", "int8", "int4"]
    verdict = choose_level("auto", "m", passing)
    assert (verdict.level, verdict.passes, verdict.measured) == ("int4", True, True)
    assert "+0.40%" in verdict.source and "0.9950" in verdict.source
    both_fail = results(int8=(0.02, 0.98))
    assert choose_level("auto", "m", both_fail).level == "none"


def test_without_results_auto_falls_back_to_int8_and_int4_is_refused() -> None:
    assert stored_results("llama-30b") is None
    assert allowed_levels("llama-30b") == ["none", "int8"]
    verdict = choose_level("auto", "llama-30b")
    assert (verdict.level, verdict.passes, verdict.measured) == ("int8", True, False)
    forced = choose_level("int4", "llama-30b")
    assert (forced.level, forced.passes) == ("int4", False) and "bench-kv" in forced.source
    assert gate_verdict("llama-30b", "none").passes


def test_forcing_a_failing_level_is_allowed_and_says_so() -> None:
    verdict = choose_level("INT4", "m", results())
    assert (verdict.level, verdict.passes, verdict.measured) == ("int4", False, True)
    with pytest.raises(ValueError, match="unknown KV compression level 'int3'"):
        choose_level("int3", "m")


def test_results_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="missing.json: file not found"):
        load_results(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SpecError, match="bad.json: malformed JSON"):
        load_results(bad)
    bad.write_text(json.dumps({"levels": {"int4": {"perplexity": 3.0}}}))
    with pytest.raises(SpecError, match="bad.json: levels.int4: needs numbers perplexity_delta_rel"):
        load_results(bad)
    bad.write_text(json.dumps({"int4": {}}))
    with pytest.raises(SpecError, match="not a bench-kv result"):
        load_results(bad)


def _plan() -> Plan:
    return plan_from_dict({"model": "m", "cluster": "c", "groups": [
        {"id": "c0", "phase": "colocated", "stages": [{"gpus": ["a:0"], "layers": [0, 2]}]}]})


def test_the_verdict_travels_with_the_plan_json() -> None:
    plan = stamp_plan(_plan(), choose_level("int4", "m", results()), forced=True)
    doc = plan.to_dict()
    assert doc["format"] == "thunderserve.plan/v2"
    assert doc["kv_transfer"]["compression"] == "int4"
    assert doc["kv_transfer"]["gate"]["passes_gate"] is False and doc["kv_transfer"]["gate"]["forced"] is True
    assert plan_from_dict(doc) == plan
    line = gate_line(plan)
    assert line is not None and "int4 (forced): did NOT pass the KV quality gate" in line
    auto = stamp_plan(_plan(), choose_level("auto", "llama-30b"), forced=False)
    assert "int8 (auto): allowed without a gate measurement" in (gate_line(auto) or "")
    # a v1 plan (no gate) still reads, and says nothing about the gate
    v1 = plan_from_dict({**_plan().to_dict(), "format": "thunderserve.plan/v1"})
    assert v1.kv_transfer.gate is None and gate_line(v1) is None


def test_shipped_results_for_smollm2_pass_int8_and_int4_at_3x() -> None:
    """The package's measured gate file (bench-kv on SmolLM2-135M): int8 and today's int4 pass, int4 at >= 3x
    fewer bytes than fp16 at 2,048-token prompts (the issue's floor), so `auto` plans SmolLM2 with int4."""
    from importlib.resources import files

    stored = stored_results("smollm2-135m")
    assert stored is not None
    assert allowed_levels("smollm2") == ["none", "int8", "int4"]
    assert choose_level("auto", "smollm2").level == "int4"
    doc = json.loads(files("thunderserve").joinpath("data/kv_gate/smollm2-135m.json").read_text())
    assert doc["config"]["corpus"]["total_tokens"] >= 20_000  # the corpus floor
    from thunderserve.runtime.kv.schemes import LEVEL_SCHEMES

    for level, scheme in LEVEL_SCHEMES.items():  # measured with the schemes the levels send now (else re-measure)
        assert doc["config"]["schemes"][level] == vars(scheme)
    assert doc["levels"]["int4"]["compression_ratio_vs_fp16"]["2048"] >= 3.0
    for level in ("bf16-storage", "fp16-storage"):
        assert level in doc["levels"]  # the yardsticks are measured beside the codecs
