"""Flow-level network in virtual time: concurrent transfers share the resources they cross.

Every transfer stream (`costmodel.network.Path`) is a flow of a number of bytes over some resources (NICs,
zone paths, node links, a node's bus) with its own cap. Rates are max-min fair (`costmodel.network.max_min_rates`),
recomputed whenever a flow starts or ends; between those events each flow drains at a constant rate, so the next
completion is known exactly and is the only event scheduled (a version number voids superseded ones). Flows
whose resources no other flow uses run at their cap, so an idle network costs what `kv_transfer_time_s` says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from thunderserve.costmodel.network import max_min_rates
from thunderserve.sim.kernel import PRIORITY_COMPLETE, EventLoop

_REL_TOL = 1e-9  # a flow with this fraction of its bytes left is done (float drift)


class _Flow:
    __slots__ = ("resources", "cap", "left", "total", "rate", "on_done", "arg")

    def __init__(self, resources: tuple[str, ...], cap: float, nbytes: float,
                 on_done: Callable[[Any], None], arg: Any) -> None:
        self.resources, self.cap, self.left, self.total = resources, cap, nbytes, nbytes
        self.rate = 0.0
        self.on_done, self.arg = on_done, arg


class FlowNetwork:
    """The active flows of one simulation and the capacities of the resources they share."""

    def __init__(self, loop: EventLoop, capacity_bytes_s: Mapping[str, float]) -> None:
        self.loop = loop
        self.capacity = dict(capacity_bytes_s)
        self.flows: list[_Flow] = []
        self.users = dict.fromkeys(self.capacity, 0)  # active flows per resource
        self.last_s = 0.0
        self.version = 0

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
        self.flows.append(_Flow(resources, cap_bytes_s, nbytes, on_done, arg))
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
            for f in self.flows:
                f.left -= f.rate * dt
        self.last_s = now

    def _reschedule(self) -> None:
        self.version += 1
        flows = self.flows
        if not flows:
            return
        rates = max_min_rates([f.resources for f in flows], [f.cap for f in flows], self.capacity)
        first = float("inf")
        for f, x in zip(flows, rates, strict=True):
            f.rate = x
            if x > 0:
                first = min(first, max(f.left, 0.0) / x)
        if first < float("inf"):
            self.loop.schedule(self.loop.now_s + first, PRIORITY_COMPLETE, self._on_event, self.version)

    def _on_event(self, version: int) -> None:
        if version != self.version:
            return  # superseded by a later start or completion
        self._advance()
        done = [f for f in self.flows if f.left <= _REL_TOL * f.total]
        if done:
            self.flows = [f for f in self.flows if f.left > _REL_TOL * f.total]
            for f in done:
                for r in f.resources:
                    self.users[r] -= 1
        self._reschedule()
        for f in done:
            f.on_done(f.arg)
