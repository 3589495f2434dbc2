"""A minimal discrete-event kernel: a heap of (time, priority, sequence) keyed callbacks.

Ties are broken by priority (lower first) and then by scheduling order, so a run is a pure function of its
inputs. Simulated time never goes back: scheduling into the past is a bug and raises. Handlers are plain
callables taking one argument; a handler can end the run early with `stop()`.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

# Priorities for events at the same instant: arrivals and completions are applied before any group decides
# what to run next, so simultaneous arrivals can share a batch.
PRIORITY_ARRIVAL = 0
PRIORITY_COMPLETE = 1
PRIORITY_DECIDE = 2

Handler = Callable[[Any], None]


class EventLoop:
    """Virtual clock plus event heap (SimPy-like, without coroutines: handlers are callbacks)."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.events_processed = 0
        self._heap: list[tuple[float, int, int, Handler, Any]] = []
        self._seq = 0

    def schedule(self, time_s: float, priority: int, handler: Handler, arg: Any = None) -> None:
        """Run `handler(arg)` at `time_s` (>= now)."""
        if time_s < self.now_s:
            raise ValueError(f"event scheduled in the past: {time_s} < now {self.now_s}")
        self._seq += 1
        heapq.heappush(self._heap, (time_s, priority, self._seq, handler, arg))

    def stop(self) -> None:
        """Drop every pending event: `run` returns after the current handler."""
        self._heap.clear()

    @property
    def pending(self) -> int:
        return len(self._heap)

    def run(self, until_s: float | None = None) -> None:
        """Process events in (time, priority, sequence) order until none is left (or time passes `until_s`)."""
        heap = self._heap
        pop = heapq.heappop
        n = 0
        try:
            while heap:
                if until_s is not None and heap[0][0] > until_s:
                    break
                time_s, _, _, handler, arg = pop(heap)
                self.now_s = time_s
                n += 1
                handler(arg)
        finally:
            self.events_processed += n
