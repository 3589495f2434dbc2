"""Sampling (greedy, seeded, top_p) and incremental text with stop strings."""

from __future__ import annotations

import torch

from thunderserve.runtime.engine.base import SamplingParams
from thunderserve.runtime.workers.sampling import TextStream, sample_token, step_seed


def _decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_greedy_and_seeded_sampling() -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_token(logits, SamplingParams(temperature=0.0), seed=1, step=0) == 1
    hot = SamplingParams(temperature=1.0)
    draws = [sample_token(logits, hot, seed=5, step=s) for s in range(40)]
    assert draws == [sample_token(logits, hot, seed=5, step=s) for s in range(40)]
    assert {1, 3} <= set(draws)
    assert draws != [sample_token(logits, hot, seed=6, step=s) for s in range(40)]
    assert step_seed(5, 0) != step_seed(5, 1) and 0 <= step_seed(2**62, 10**9) < 2**63


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    narrow = SamplingParams(temperature=1.0, top_p=0.6)
    assert {sample_token(logits, narrow, seed=1, step=s) for s in range(200)} == {0, 1}
    tiny = SamplingParams(temperature=1.0, top_p=0.01)
    assert {sample_token(logits, tiny, seed=1, step=s) for s in range(50)} == {0}


def test_stop_string_across_tokens_is_never_emitted() -> None:
    ts = TextStream(_decode, stop=("END",))
    emitted = []
    for ch in "abcEN":
        delta, stopped = ts.push(ord(ch))
        emitted.append(delta)
        assert not stopped
    assert "".join(emitted) == "abc"  # "EN" is held back: it may start "END"
    delta, stopped = ts.push(ord("D"))
    assert stopped and delta == ""
    ts2 = TextStream(_decode, stop=("END",))
    out = "".join(ts2.push(ord(c))[0] for c in "xENy")
    assert out == "xENy"  # a prefix that did not complete is released


def test_incomplete_utf8_is_held_until_complete() -> None:
    ts = TextStream(_decode)
    raw = "é".encode()
    assert ts.push(raw[0]) == ("", False)
    assert ts.push(raw[1]) == ("é", False)
    ts.push(ord("!"))
    assert ts.flush() == ""


def test_special_tokens_are_not_text_and_flush_releases_the_rest() -> None:
    ts = TextStream(_decode, stop=("zz",), special_ids=frozenset({300}))
    assert ts.push(ord("a")) == ("a", False)
    assert ts.push(ord("z")) == ("", False)
    assert ts.push(300) == ("", False)
    assert ts.flush() == "z" and ts.token_ids == [ord("a"), ord("z")]
