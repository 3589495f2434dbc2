"""bench-kv (`quality.bench`) on a tiny model: the result's shape, the gate's verdicts, and the invariants of
its numbers; the teacher-forced scoring path against step-by-step decoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from thunderserve.quality.bench import ALL_LEVELS, bench_kv, format_table
from thunderserve.quality.corpus import CorpusConfig, corpus_text, documents
from thunderserve.quality.gate import GATE
from thunderserve.runtime.engine import DecodeInput, StepItem, load_engine
from thunderserve.runtime.kv.schemes import LEVEL_SCHEMES

CORPUS = CorpusConfig(num_docs=2, prompt_tokens=64, continuation_tokens=12)
LEVEL_KEYS = {"passes_gate", "perplexity", "perplexity_delta_rel", "teacher_forced_agreement", "kl_mean",
              "free_running_agreement", "first_divergence", "prompts_diverged", "compression_ratio_vs_fp16",
              "quantize_gbps", "dequantize_gbps"}


def test_bench_kv_reports_every_level_in_the_gate_shape(tiny_dir: Path) -> None:
    ticks: list[tuple[int, int, str]] = []
    engine = load_engine(tiny_dir)
    result = bench_kv(model=str(tiny_dir), corpus=CORPUS, prompts=["hello world", "tell me a story"], num_tokens=5,
                      repeats=1, ratio_tokens=(32, 64), engine=engine,
                      progress=lambda d, t, w: ticks.append((d, t, w)))
    assert set(result) == {"gate", "config", "levels"}
    assert result["gate"]["max_perplexity_delta_rel"] == 0.01 and result["gate"]["min_teacher_forced_agreement"] == 0.99
    assert tuple(result["levels"]) == ALL_LEVELS == ("none", "int8", "int4", "bf16-storage", "fp16-storage")
    corpus = result["config"]["corpus"]
    assert corpus["total_tokens"] == 2 * 76 and corpus["scored_tokens"] == 2 * 11
    for name, r in result["levels"].items():
        assert set(r) == LEVEL_KEYS, name
        assert r["passes_gate"] == GATE.passes(r["perplexity_delta_rel"], r["teacher_forced_agreement"])
        assert r["perplexity"] > 0 and 0 <= r["teacher_forced_agreement"] <= 1 and r["kl_mean"] >= -1e-6
        assert r["perplexity"] == pytest.approx(corpus["reference_perplexity"] * (1 + r["perplexity_delta_rel"]))
        assert len(r["first_divergence"]) == 2 and all(0 <= d <= 5 for d in r["first_divergence"])
        assert (r["free_running_agreement"] == 1.0) == (r["prompts_diverged"] == 0)
        assert set(r["compression_ratio_vs_fp16"]) == {"32", "64"}
        assert r["quantize_gbps"] > 0 and r["dequantize_gbps"] > 0
    none = result["levels"]["none"]  # the exact codec: no change at all
    assert none["perplexity_delta_rel"] == 0.0 and none["teacher_forced_agreement"] == 1.0
    assert abs(none["kl_mean"]) < 1e-6 and none["free_running_agreement"] == 1.0 and none["passes_gate"]
    for name in ("bf16-storage", "fp16-storage"):
        assert result["levels"][name]["compression_ratio_vs_fp16"] == {"32": 1.0, "64": 1.0}
    # fp16 keeps 3 more mantissa bits than bf16: it moves the distribution less
    assert result["levels"]["fp16-storage"]["kl_mean"] <= result["levels"]["bf16-storage"]["kl_mean"]
    for level, scheme in LEVEL_SCHEMES.items():  # every byte counted: the scheme's own count plus the header
        for tokens, ratio in result["levels"][level]["compression_ratio_vs_fp16"].items():
            fp16 = 2 * 2 * 2 * int(tokens) * 16 * 2  # layers x kv heads x K/V x tokens x head_dim x 2 bytes
            assert 1 / ratio == pytest.approx(scheme.bytes_vs_fp16(int(tokens), head_dim=16) + 48 / fp16)
    assert [d for d, _, _ in ticks] == list(range(1, len(ticks) + 1)) and {t for _, t, _ in ticks} == {len(ticks)}
    table = format_table(result)
    assert GATE.describe() in table and all(name in table for name in ALL_LEVELS)
    with pytest.raises(ValueError, match="unknown level 'int3'"):
        bench_kv(levels=("int3",), engine=engine)


def test_corpus_is_fixed_real_prose_cut_into_documents(tiny_dir: Path) -> None:
    text = corpus_text()
    assert text.startswith('The "assert" statement') and len(text) > 120_000
    docs = documents(load_engine(tiny_dir).encode, CORPUS)
    assert [(len(d.prompt), len(d.continuation)) for d in docs] == [(64, 12), (64, 12)]
    assert CorpusConfig().total_tokens >= 20_000  # the gate's budget
    with pytest.raises(ValueError, match="corpus has"):
        documents(lambda s: list(range(10)), CORPUS)


def test_every_token_logits_match_step_by_step_decoding(tiny_dir: Path) -> None:
    """Scoring a continuation in one chunk over a prompt's cache gives the logits decoding it token by token
    would (the path bench-kv's perplexity uses)."""
    engine = load_engine(tiny_dir)
    prompt, cont = list(range(3, 40)), [7, 99, 12, 5, 61]
    kv = engine.prefill([prompt])[0].kv
    chunk, _ = engine.forward([StepItem(token_ids=cont, kv=kv)], every_token=True)
    assert chunk[0].shape == (len(cont), engine.vocab_size)
    kv2 = engine.prefill([prompt])[0].kv
    steps = [engine.decode([DecodeInput(t, kv2)])[0] for t in cont]
    assert torch.allclose(chunk[0], torch.stack(steps), atol=1e-4)
    assert math.isfinite(float(chunk[0].sum()))
