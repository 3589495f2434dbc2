"""Event kernel: (time, priority, sequence) order, no time travel, early stop."""

from __future__ import annotations

import pytest

from thunderserve.sim.kernel import PRIORITY_ARRIVAL, PRIORITY_COMPLETE, PRIORITY_DECIDE, EventLoop


def test_events_run_in_time_then_priority_then_sequence_order() -> None:
    loop = EventLoop()
    seen: list[str] = []
    loop.schedule(2.0, PRIORITY_ARRIVAL, seen.append, "t2")
    loop.schedule(1.0, PRIORITY_DECIDE, seen.append, "t1-decide")
    loop.schedule(1.0, PRIORITY_ARRIVAL, seen.append, "t1-arrive-a")
    loop.schedule(1.0, PRIORITY_COMPLETE, seen.append, "t1-complete")
    loop.schedule(1.0, PRIORITY_ARRIVAL, seen.append, "t1-arrive-b")
    loop.run()
    assert seen == ["t1-arrive-a", "t1-arrive-b", "t1-complete", "t1-decide", "t2"]
    assert loop.now_s == 2.0 and loop.events_processed == 5


def test_scheduling_into_the_past_raises() -> None:
    loop = EventLoop()

    def late(_: object) -> None:
        loop.schedule(0.5, PRIORITY_ARRIVAL, print)

    loop.schedule(1.0, PRIORITY_ARRIVAL, late)
    with pytest.raises(ValueError, match="past"):
        loop.run()


def test_stop_drops_pending_events_and_until_leaves_later_ones() -> None:
    loop = EventLoop()
    seen: list[float] = []
    loop.schedule(1.0, 0, lambda _: (seen.append(loop.now_s), loop.stop()))
    loop.schedule(2.0, 0, lambda _: seen.append(loop.now_s))
    loop.run()
    assert seen == [1.0] and loop.pending == 0
    loop.schedule(3.0, 0, lambda _: seen.append(loop.now_s))
    loop.schedule(5.0, 0, lambda _: seen.append(loop.now_s))
    loop.run(until_s=4.0)
    assert seen == [1.0, 3.0] and loop.pending == 1
