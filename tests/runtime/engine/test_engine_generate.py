"""Generator: continuous batching gives each request the same output as running it alone; sampling, stops."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_builders import hf_greedy, hf_model

from thunderserve.runtime.engine import Generator, LlamaEngine, SamplingParams, load_engine
from thunderserve.runtime.fakes import FAKE_EOS, FakeEngine

PROMPTS = ["hello world how are you", "tell me a story", "once upon a time the cat", "the dog ran far away",
           "what time is it", "good day", "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12", "a"]


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> LlamaEngine:
    return load_engine(tiny_dir)


def alone(engine: LlamaEngine, prompt: str, params: SamplingParams) -> tuple[list[int], str, str | None]:
    gen = Generator(engine)
    out = gen.generate([prompt], params)[0]
    return out.token_ids, out.text, out.finish_reason


def test_batched_outputs_equal_alone_and_transformers(engine: LlamaEngine, tiny_dir: Path) -> None:
    ref = hf_model(tiny_dir)
    gen = Generator(engine, max_batch_size=5)
    max_tokens = [12, 5, 20, 9, 16, 3, 11, 14]
    ids = [gen.add_request(p, SamplingParams(max_tokens=m)) for p, m in zip(PROMPTS[:4], max_tokens, strict=False)]
    for _ in range(3):
        gen.step()
    ids += [gen.add_request(p, SamplingParams(max_tokens=m)) for p, m in zip(PROMPTS[4:], max_tokens[4:],
                                                                             strict=True)]
    steps = 3
    while gen.has_unfinished():
        assert gen.num_running <= 5
        gen.step()
        steps += 1
    assert steps < sum(max_tokens)  # really batched
    for rid, prompt, m in zip(ids, PROMPTS, max_tokens, strict=True):
        out = gen.get(rid)
        solo = alone(engine, prompt, SamplingParams(max_tokens=m))
        assert (out.token_ids, out.text, out.finish_reason) == solo
        want = hf_greedy(ref, engine.encode(prompt), m)
        eos = engine.eos_token_ids[0]
        want = want[: want.index(eos) + 1] if eos in want else want
        assert out.token_ids == want
        assert out.finish_reason == ("stop" if want[-1] == eos else "length")
        assert out.text == engine.decode_text(out.token_ids)


def test_each_step_gives_every_running_sequence_one_token(engine: LlamaEngine) -> None:
    gen = Generator(engine)
    a = gen.add_request("tell me a story", SamplingParams(max_tokens=6))
    first = gen.step()
    assert [o.request_id for o in first] == [a] and len(gen.get(a).token_ids) == 1
    b = gen.add_request([5, 6, 7], SamplingParams(max_tokens=6))
    second = gen.step()
    assert sorted(o.request_id for o in second) == sorted([a, b])
    assert (len(gen.get(a).token_ids), len(gen.get(b).token_ids)) == (2, 1)
    gen.abort(b)
    assert gen.get(b).finish_reason == "abort" and gen.num_running == 1
    gen.run()
    assert len(gen.get(a).token_ids) == 6 and gen.get(a).finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_batch_independent(engine: LlamaEngine) -> None:
    params = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=s) for s in range(4)]
    batched = Generator(engine).generate(["tell me a story"] * 4, params)
    for p, out in zip(params, batched, strict=True):
        assert out.token_ids == alone(engine, "tell me a story", p)[0]
    assert len({tuple(o.token_ids) for o in batched}) > 1
    nucleus = SamplingParams(max_tokens=10, temperature=0.7, top_p=1e-6, seed=9)  # keeps only the top token
    assert alone(engine, "tell me a story", nucleus)[0] == alone(engine, "tell me a story",
                                                                 SamplingParams(max_tokens=10))[0]


def test_stop_strings_end_and_are_trimmed(engine: LlamaEngine) -> None:
    ids, text, _ = alone(engine, "once upon a time the cat", SamplingParams(max_tokens=20))
    words = text.split()
    assert len(words) > 4
    stop = words[3]
    stopped, stopped_text, reason = alone(engine, "once upon a time the cat",
                                          SamplingParams(max_tokens=20, stop=(stop,)))
    assert reason == "stop" and stop not in stopped_text
    assert text.startswith(stopped_text) and len(stopped) < len(ids)


def test_eos_and_context_limits() -> None:
    fake = FakeEngine(eos_every=9, max_context_tokens=40)
    gen = Generator(fake)
    out = gen.generate(["abcdef"], SamplingParams(max_tokens=30))[0]
    assert out.token_ids == fake.greedy(fake.encode("abcdef"), 30) and out.token_ids[-1] == FAKE_EOS
    assert out.finish_reason == "stop" and len(out.token_ids) == 4  # 6 prompt tokens + 3, then EOS at 9
    assert FAKE_EOS not in fake.encode(out.text)
    long = Generator(FakeEngine(max_context_tokens=12)).generate(["abcdefghij"], SamplingParams(max_tokens=30))[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 2
    with pytest.raises(ValueError, match="empty"):
        gen.add_request([])
    with pytest.raises(ValueError, match="context"):
        gen.add_request("x" * 40)
    gen.add_request("abc", request_id="r1")
    with pytest.raises(ValueError, match="duplicate"):
        gen.add_request("abc", request_id="r1")
