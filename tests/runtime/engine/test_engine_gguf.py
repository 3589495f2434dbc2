"""GGUF loading: llama.cpp's q/k permutation undone, converted once into the cache (atomically), reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_builders import engine_greedy, hf_greedy, hf_model, write_tiny_gguf

from thunderserve.runtime.engine import load_engine, resolve_model_dir
from thunderserve.runtime.engine.gguf_convert import MARKER, cache_root, permute_qk, unpermute_qk

PROMPTS = [[5, 9, 14, 2, 77, 30, 31], [100, 3], list(range(60, 90))]


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    w = torch.randn(4 * 16, 8)
    assert torch.equal(unpermute_qk(permute_qk(w, 4), 4), w)
    assert not torch.equal(permute_qk(w, 4), w)


def test_f32_gguf_gives_the_same_model_as_the_hf_directory(tiny4_dir: Path, tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tiny4_dir, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    eng = load_engine(gguf_path, cache_dir=cache)
    ref = load_engine(tiny4_dir)
    for a, b in zip(eng.prefill(PROMPTS), ref.prefill(PROMPTS), strict=True):
        assert torch.equal(a.logits, b.logits)
    assert eng.spec.tie_word_embeddings and eng.text is None
    converted = resolve_model_dir(gguf_path, cache_dir=cache)
    assert converted.parent == cache / "models"
    assert json.loads((converted / MARKER).read_text())["source"] == str(gguf_path)
    assert [p.name for p in (cache / "models").iterdir()] == [converted.name]  # no temp dirs left behind


def test_conversion_happens_once(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = write_tiny_gguf(tiny_dir, tmp_path / "tiny.gguf")
    monkeypatch.setenv("THUNDERSERVE_CACHE", str(tmp_path / "env-cache"))
    assert cache_root() == tmp_path / "env-cache" and cache_root(tmp_path / "arg") == tmp_path / "arg"
    first = resolve_model_dir(gguf_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    import thunderserve.runtime.engine.gguf_convert as conv

    monkeypatch.setattr(conv, "convert_gguf", lambda *_a, **_k: pytest.fail("converted twice"))
    assert resolve_model_dir(gguf_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_quantized_gguf_matches_transformers_on_the_converted_dir(tiny_dir: Path, tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tiny_dir, tmp_path / "tiny-q8.gguf", quantized=True)
    eng = load_engine(gguf_path, cache_dir=tmp_path / "cache")
    ref = hf_model(resolve_model_dir(gguf_path, cache_dir=tmp_path / "cache"))
    for prompt in PROMPTS:
        assert engine_greedy(eng, prompt, 10) == hf_greedy(ref, prompt, 10)
    full = load_engine(tiny_dir).prefill(PROMPTS[:1])[0].logits
    assert float((eng.prefill(PROMPTS[:1])[0].logits - full).abs().max()) < 0.2 * float(full.abs().max())


def test_unknown_model_reference_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither"):
        load_engine(tmp_path / "nope")
