"""Paged KV memory decisions: blocks per sequence, when a step needs a block, whom to preempt."""

from __future__ import annotations

from thunderserve.policy.kv_blocks import BLOCK_TOKENS, block_capacity, blocks_for, needs_block, preemptions


def test_blocks_round_up_to_16_tokens() -> None:
    assert BLOCK_TOKENS == 16
    assert [blocks_for(t) for t in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]
    assert block_capacity(1000) == 62
    assert needs_block(16) and needs_block(0) and not needs_block(17)


def test_no_preemption_when_the_new_blocks_fit() -> None:
    assert preemptions(3, 3, 5, iter(())) == 0


def test_latest_admitted_are_preempted_until_the_new_blocks_fit() -> None:
    # newest first: (blocks held, needs a new block this step)
    victims = [(2, True), (1, False), (5, True), (9, True)]
    assert preemptions(4, 1, 4, victims) == 1  # frees 2 and drops its need: 3 needed <= 3 free
    assert preemptions(4, 0, 4, victims) == 2  # 3 freed, 3 needed
    assert preemptions(6, 0, 4, victims) == 3  # 8 freed, 4 needed


def test_the_oldest_is_kept_unless_other_work_will_free_memory() -> None:
    victims = [(1, True), (1, True)]
    assert preemptions(10, 0, 2, victims) == 1  # the oldest runs over-committed rather than stall
    assert preemptions(10, 0, 2, victims, keep_one=False) == 2


def test_victims_are_read_lazily() -> None:
    read: list[int] = []

    def newest_first():  # type: ignore[no-untyped-def]
        for i in range(1000):
            read.append(i)
            yield (4, False)

    assert preemptions(5, 0, 1000, newest_first()) == 2
    assert len(read) <= 3
