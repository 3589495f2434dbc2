"""Shared decision code: weighted routing and batching/admission."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from thunderserve.policy import WeightedChooser, admit_decodes, plan_chunked_step, select_prefill_batch


def test_weighted_chooser_follows_shares_exactly_over_a_cycle() -> None:
    w = WeightedChooser({"a": 0.7, "b": 0.3})
    picks = [w.choose() for _ in range(10)]
    assert picks.count("a") == 7 and picks.count("b") == 3


@given(st.dictionaries(st.sampled_from("abcdef"), st.floats(0.01, 10), min_size=1), st.integers(1, 300))
def test_weighted_chooser_counts_stay_close_to_share(shares: dict[str, float], n: int) -> None:
    w = WeightedChooser(shares)
    picks = [w.choose() for _ in range(n)]
    total = sum(shares.values())
    for k, v in shares.items():
        assert abs(picks.count(k) - n * v / total) <= 2


def test_weighted_chooser_excludes_dead_targets() -> None:
    w = WeightedChooser({"a": 0.5, "b": 0.5})
    assert {w.choose(exclude={"a"}) for _ in range(5)} == {"b"}


def test_prefill_batch_respects_budget_and_kv() -> None:
    assert select_prefill_batch([1000, 2000, 1500], 4096, 1e9) == 2
    assert select_prefill_batch([5000, 10], 4096, 1e9) == 1  # a long prompt runs alone
    assert select_prefill_batch([5000], 4096, 4000) == 0  # KV full: wait, never drop


def test_decode_admission_reserves_kv() -> None:
    assert admit_decodes([100, 100, 100], kv_free_tokens=250, running=0) == 2
    assert admit_decodes([100], kv_free_tokens=1000, running=4, max_batch_size=4) == 0


def test_chunked_step_puts_decodes_first() -> None:
    assert plan_chunked_step(10, [3000, 500], 2048) == [2038]
    assert plan_chunked_step(0, [100, 200, 5000], 1000) == [100, 200, 700]
    assert plan_chunked_step(2048, [10], 2048) == []
