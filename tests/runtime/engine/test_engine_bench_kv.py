"""bench_kv on a tiny model: the result's shape and the invariants of its numbers."""

from __future__ import annotations

from pathlib import Path

import pytest

from thunderserve.cli_bench_kv import PROMPT_SETS, bench_kv, format_table, main
from thunderserve.costmodel.comm import compression_ratio
from thunderserve.runtime.engine import load_engine

FIDELITY = {"token_agreement", "token_agreement_teacher_forced", "max_logit_error", "top2_margin_shift_median",
            "top2_margin_shift_p90", "per_set"}
METRICS = FIDELITY | {"compression_ratio_vs_fp16", "compression_ratio_bench_prompts", "quantize_gbps",
                      "dequantize_gbps"}
PER_SET = {"token_agreement", "token_agreement_teacher_forced", "max_logit_error", "first_divergence",
           "divergence_gaps"}


def test_bench_kv_reports_every_metric(tiny_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    prompts = ["hello world", "tell me a story", "once upon a time"]
    result = bench_kv(model=str(tiny_dir), num_tokens=6, prompts=prompts, repeats=1, ratio_tokens=64,
                      engine=load_engine(tiny_dir))
    cfg = result["config"]
    assert cfg["prompt_sets"]["custom"]["num_prompts"] == 3 and cfg["num_tokens"] == 6
    assert cfg["ratio_tokens"] == 64 and cfg["sink_tokens"] == 1
    for c in ("int8", "int4"):
        r = result[c]
        assert set(r) == METRICS and set(r["per_set"]) == {"custom"}
        s = r["per_set"]["custom"]
        assert set(s) == PER_SET and s["token_agreement"] == r["token_agreement"]
        assert 0.0 <= r["token_agreement"] <= 1.0 and r["max_logit_error"] >= 0.0
        assert len(s["first_divergence"]) == 3 and all(0 <= d <= 6 for d in s["first_divergence"])
        # a prompt that never diverges agrees on all of its tokens
        assert (r["token_agreement"] == 1.0) == all(d == 6 for d in s["first_divergence"])
        # a gap is reported exactly where a prompt diverged, and a top-2 gap is never negative
        assert [g is None for g in s["divergence_gaps"]] == [d == 6 for d in s["first_divergence"]]
        assert all(g >= 0 for g in s["divergence_gaps"] if g is not None)
        assert r["token_agreement_teacher_forced"] >= r["token_agreement"] - 0.5
        assert r["quantize_gbps"] > 0 and r["dequantize_gbps"] > 0
        # the 64-token prompt's ratio is the cost model's (head_dim 16 here: value groups of 16), header aside
        assert 1 / r["compression_ratio_vs_fp16"] == pytest.approx(compression_ratio(c, group_size=16,
                                                                                     num_tokens=64), rel=0.05)
    assert result["int8"]["max_logit_error"] < result["int4"]["max_logit_error"]
    assert result["int8"]["top2_margin_shift_p90"] < result["int4"]["top2_margin_shift_p90"]
    nearest = cfg["reference_min_top2_gap"]["custom"]
    assert len(nearest) == 3 and all(g >= 0 for g in nearest)
    for c in ("int8", "int4"):  # a prompt flips only where the reference had a tie at most that close
        s = result[c]["per_set"]["custom"]
        assert all(g is None or g >= m for g, m in zip(s["divergence_gaps"], nearest, strict=True))
    assert result["int8"]["compression_ratio_vs_fp16"] > 1.5
    assert result["int4"]["compression_ratio_vs_fp16"] > result["int8"]["compression_ratio_vs_fp16"]
    table = format_table(result)
    assert "int4" in table and "custom" in table
    main(["--model", str(tiny_dir), "--num-tokens", "3", "--json"])
    assert '"int4"' in capsys.readouterr().out


def test_bench_kv_runs_every_prompt_set_and_pools_them(tiny_dir: Path) -> None:
    sets = {"a": ["hello world", "good morning"], "b": ["tell me a story"]}
    result = bench_kv(model=str(tiny_dir), num_tokens=4, prompt_sets=sets, compressions=("int4",), repeats=1,
                      ratio_tokens=32, engine=load_engine(tiny_dir))
    r = result["int4"]
    assert set(r["per_set"]) == {"a", "b"} and set(result["config"]["prompt_sets"]) == {"a", "b"}
    pooled = (2 * r["per_set"]["a"]["token_agreement"] + r["per_set"]["b"]["token_agreement"]) / 3
    assert r["token_agreement"] == pytest.approx(pooled)
    assert r["max_logit_error"] == max(s["max_logit_error"] for s in r["per_set"].values())
    assert set(PROMPT_SETS) == {"everyday", "technical", "open"} and all(len(p) == 8 for p in PROMPT_SETS.values())


def test_storage_references_measure_plain_16_bit_caches(tiny_dir: Path) -> None:
    ticks: list[tuple[int, int, str]] = []
    result = bench_kv(model=str(tiny_dir), num_tokens=5, prompts=["hello world", "tell me a story"],
                      compressions=("int4",), storage_references=("fp16", "bf16"), repeats=1, ratio_tokens=32,
                      engine=load_engine(tiny_dir), progress=lambda d, t, w: ticks.append((d, t, w)))
    assert [d for d, _, _ in ticks] == [1, 2, 3, 4] and {t for _, t, _ in ticks} == {4}
    assert [w for _, _, w in ticks] == ["reference custom", "int4 custom", "fp16 custom", "bf16 custom"]
    refs = result["storage_reference"]
    assert set(refs) == {"fp16", "bf16"}
    for r in refs.values():
        assert set(r) == FIDELITY and 0 <= r["top2_margin_shift_median"] <= r["top2_margin_shift_p90"]
        assert set(r["per_set"]["custom"]) == PER_SET
    # fp16 keeps 3 more mantissa bits than bf16: its first-step logits move less
    assert refs["fp16"]["max_logit_error"] <= refs["bf16"]["max_logit_error"]
    assert "fp16 store" in format_table(result)
    with pytest.raises(ValueError, match="unknown storage reference 'fp8'"):
        bench_kv(model=str(tiny_dir), num_tokens=3, prompts=["hi"], storage_references=("fp8",),
                 engine=load_engine(tiny_dir))
