"""Flow-level network in virtual time: concurrent transfers share the resources they cross.

Every transfer stream (`costmodel.network.Path`) is a flow of a number of bytes over some resources (NICs,
zone paths, node links, a node's bus) with its own cap. Rates are max-min fair (`costmodel.network.max_min_rates`),
recomputed whenever a flow starts or ends; between those events each flow drains at a constant rate, so the next
completion is known exactly and is the only event scheduled (a version number voids superseded ones). Flows
whose resources no other flow uses run at their cap, so an idle network costs what `kv_transfer_time_s` says.

Cost: flows over the same resources with the same cap always get the same rate, so they form one class with a
shared service counter and a heap of finishing points (processor sharing inside the class); fairness is solved
over classes (a handful per plan), not over the flows in flight (hundreds when a plan is overloaded).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from typing import Any

from thunderserve.costmodel.network import max_min_rates
from thunderserve.sim.kernel import PRIORITY_COMPLETE, EventLoop

_REL_TOL = 1e-9  # a flow this close (relative) to its last byte is done (float drift)


class _Class:
    """Active flows over the same resources with the same cap."""

    __slots__ = ("resources", "cap", "served", "rate", "heap")

    def __init__(self, resources: tuple[str, ...], cap: float) -> None:
        self.resources, self.cap = resources, cap
        self.served = 0.0  # bytes each flow of the class has received since the class was created
        self.rate = 0.0  # bytes/s per flow
        self.heap: list[tuple[float, int, Callable[[Any], None], Any]] = []  # (served when done, seq, cb, arg)


class FlowNetwork:
    """The active flows of one simulation and the capacities of the resources they share."""

    def __init__(self, loop: EventLoop, capacity_bytes_s: Mapping[str, float]) -> None:
        self.loop = loop
        self.capacity = dict(capacity_bytes_s)
        self.classes: dict[tuple[tuple[str, ...], float], _Class] = {}
        self.active: list[_Class] = []
        self.users = dict.fromkeys(self.capacity, 0)  # active flows per resource
        self.last_s = 0.0
        self.version = 0
        self.seq = 0

    def add_resources(self, capacity_bytes_s: Mapping[str, float]) -> None:
        """Resources of nodes that joined the cluster (existing ones keep their capacity)."""
        for name, cap in capacity_bytes_s.items():
            if name not in self.capacity:
                self.capacity[name] = cap
                self.users[name] = 0

    def start(self, resources: tuple[str, ...], cap_bytes_s: float, nbytes: float,
              on_done: Callable[[Any], None], arg: Any) -> None:
        """Start a flow; `on_done(arg)` runs when its last byte arrives."""
        if nbytes <= 0 or cap_bytes_s == float("inf") and not resources:
            self.loop.schedule(self.loop.now_s, PRIORITY_COMPLETE, on_done, arg)
            return
        self._advance()
        key = (resources, cap_bytes_s)
        c = self.classes.get(key)
        if c is None:
            c = self.classes[key] = _Class(resources, cap_bytes_s)
        if not c.heap:
            self.active.append(c)
        self.seq += 1
        heapq.heappush(c.heap, (c.served + nbytes, self.seq, on_done, arg))
        for r in resources:
            self.users[r] += 1
        self._reschedule()

    def slowdown(self, resources: tuple[str, ...], cap_bytes_s: float) -> float:
        """How much slower than alone a new, short flow would run now, if it took an equal share of each
        resource it crosses (the estimate for pipeline-stage sends, which are not themselves tracked)."""
        worst = 1.0
        for r in resources:
            worst = max(worst, cap_bytes_s * (self.users[r] + 1) / self.capacity[r])
        return worst

    def _advance(self) -> None:
        now = self.loop.now_s
        dt = now - self.last_s
        if dt > 0:
            for c in self.active:
                c.served += c.rate * dt
        self.last_s = now

    def _reschedule(self) -> None:
        self.version += 1
        active = self.active
        if not active:
            return
        rates = max_min_rates([c.resources for c in active], [c.cap for c in active], self.capacity,
                              [len(c.heap) for c in active])
        first = float("inf")
        for c, x in zip(active, rates, strict=True):
            c.rate = x
            if x > 0:
                first = min(first, max(c.heap[0][0] - c.served, 0.0) / x)
        if first < float("inf"):
            self.loop.schedule(self.loop.now_s + first, PRIORITY_COMPLETE, self._on_event, self.version)

    def _on_event(self, version: int) -> None:
        if version != self.version:
            return  # superseded by a later start or completion
        self._advance()
        done: list[tuple[Callable[[Any], None], Any]] = []
        for c in self.active:
            limit = c.served + _REL_TOL * max(c.served, 1.0)
            while c.heap and c.heap[0][0] <= limit:
                _, _, cb, arg = heapq.heappop(c.heap)
                done.append((cb, arg))
                for r in c.resources:
                    self.users[r] -= 1
        self.active = [c for c in self.active if c.heap]
        self._reschedule()
        for cb, arg in done:
            cb(arg)
