"""bench_kv on a tiny model: the result's shape and the invariants of its numbers."""

from __future__ import annotations

from pathlib import Path

from thunderserve.cli_bench_kv import bench_kv, main
from thunderserve.runtime.engine import load_engine


def test_bench_kv_reports_every_metric(tiny_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    prompts = ["hello world", "tell me a story", "once upon a time"]
    result = bench_kv(model=str(tiny_dir), num_tokens=6, prompts=prompts, repeats=1,
                      engine=load_engine(tiny_dir))
    assert result["config"]["num_prompts"] == 3 and result["config"]["num_tokens"] == 6
    for c in ("int8", "int4"):
        r = result[c]
        assert set(r) == {"compression_ratio_vs_fp16", "quantize_gbps", "dequantize_gbps", "token_agreement",
                          "token_agreement_teacher_forced", "max_logit_error"}
        assert 0.0 <= r["token_agreement"] <= 1.0 and r["max_logit_error"] >= 0.0
        assert r["token_agreement_teacher_forced"] >= r["token_agreement"] - 0.5
        assert r["quantize_gbps"] > 0 and r["dequantize_gbps"] > 0
    assert result["int8"]["max_logit_error"] < result["int4"]["max_logit_error"]
    assert result["int8"]["compression_ratio_vs_fp16"] > 1.25  # head_dim 16 here: groups of 16
    assert result["int4"]["compression_ratio_vs_fp16"] > result["int8"]["compression_ratio_vs_fp16"]
    main(["--model", str(tiny_dir), "--num-tokens", "3", "--json"])
    assert '"int4"' in capsys.readouterr().out
