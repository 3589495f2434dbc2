"""Event kernel invariant: whatever handlers schedule, virtual time never goes back, and events known in
advance run in (time, priority, scheduling order)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from thunderserve.sim.kernel import EventLoop


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.integers(0, 2)), min_size=1, max_size=30),
       st.lists(st.tuples(st.floats(0, 3), st.integers(0, 2)), max_size=60))
def test_time_never_goes_back(initial: list[tuple[float, int]], follow_ups: list[tuple[float, int]]) -> None:
    loop = EventLoop()
    seen: list[tuple[float, int, int]] = []
    pending = list(follow_ups)
    counter = iter(range(10**6))

    def handler(arg: tuple[int, int]) -> None:
        priority, seq = arg
        seen.append((loop.now_s, priority, seq))
        if pending:
            delay, prio = pending.pop()
            loop.schedule(loop.now_s + delay, prio, handler, (prio, next(counter)))

    for time_s, prio in initial:
        loop.schedule(time_s, prio, handler, (prio, next(counter)))
    loop.run()
    times = [t for t, _, _ in seen]
    assert times == sorted(times)  # virtual time never goes back
    first = [e for e in seen if e[2] < len(initial)]  # scheduled before the run: fully ordered
    assert first == sorted(first)
    assert loop.events_processed == len(seen) == len(initial) + len(follow_ups)
