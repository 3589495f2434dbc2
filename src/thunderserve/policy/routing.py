"""Routing choice: which group gets the next request / KV cache, following the plan's shares.

Smooth weighted round-robin (the algorithm nginx uses): deterministic, spreads picks evenly in time, and
after n picks each target's count stays close to n x share (within 1 in practice;
the tests check a bound of 2, which holds for any shares). The simulator and the runtime
both use it, so the sequence of choices is the same in virtual and real time. `LeastOutstandingChooser` is the
load-aware alternative (`Dispatch.LEAST_OUTSTANDING`), available to every system in the simulator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum


class WeightedChooser:
    """Pick targets in proportion to shares; targets can be excluded per pick (e.g. dead workers)."""

    def __init__(self, shares: Mapping[str, float]) -> None:
        self._shares: dict[str, float] = {}
        self._current: dict[str, float] = {}
        self.update(shares)

    @property
    def shares(self) -> dict[str, float]:
        return dict(self._shares)

    def update(self, shares: Mapping[str, float]) -> None:
        """Replace the shares (e.g. after re-planning); positive shares only, order-independent."""
        self._shares = {k: float(v) for k, v in sorted(shares.items()) if v > 0}
        self._current = {k: self._current.get(k, 0.0) for k in self._shares}

    def choose(self, exclude: Iterable[str] = ()) -> str:
        """Next target; raises LookupError when every target is excluded or there is none."""
        banned = set(exclude)
        live = [k for k in self._shares if k not in banned]
        if not live:
            raise LookupError("no routing target available")
        total = sum(self._shares[k] for k in live)
        for k in live:
            self._current[k] += self._shares[k]
        best = max(live, key=lambda k: (self._current[k], -live.index(k)))
        self._current[best] -= total
        return best


class Dispatch(StrEnum):
    """How a router picks among a plan's targets."""

    WEIGHTED = "weighted"  # smooth weighted round-robin over the plan's shares (WeightedChooser)
    LEAST_OUTSTANDING = "least_outstanding"  # fewest requests in flight per unit of share (LeastOutstandingChooser)


class LeastOutstandingChooser:
    """Load-aware pick: the target with the fewest outstanding (dispatched, not yet released) requests per unit
    of its plan share, as nginx's weighted `least_conn` does; ties go to the target first in id order. With
    equal shares this is the least-outstanding-requests balancer put in front of vLLM replicas, and DistServe's
    least-loaded dispatch. The caller reports `started` on dispatch and `released` when the target is done
    with the request. Choosers given the same `counts` dict share the load they see (several prefill groups
    sending KV caches to the same decode groups)."""

    def __init__(self, shares: Mapping[str, float], counts: dict[str, int] | None = None) -> None:
        self._shares = {k: float(v) for k, v in sorted(shares.items()) if v > 0}
        self._outstanding = counts if counts is not None else {}
        for k in self._shares:
            self._outstanding.setdefault(k, 0)

    @property
    def shares(self) -> dict[str, float]:
        return dict(self._shares)

    def outstanding(self, target: str) -> int:
        return self._outstanding[target]

    def choose(self, exclude: Iterable[str] = ()) -> str:
        """Next target (not yet counted: call `started`); LookupError when none is available."""
        banned = set(exclude)
        live = [k for k in self._shares if k not in banned]
        if not live:
            raise LookupError("no routing target available")
        return min(live, key=lambda k: ((self._outstanding[k] + 1) / self._shares[k], live.index(k)))

    def started(self, target: str) -> None:
        self._outstanding[target] += 1

    def released(self, target: str) -> None:
        if self._outstanding[target] <= 0:
            raise ValueError(f"{target} has no outstanding request to release")
        self._outstanding[target] -= 1
