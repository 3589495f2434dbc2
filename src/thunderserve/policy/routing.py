"""Routing choice: which group gets the next request / KV cache, following the plan's shares.

Smooth weighted round-robin (the algorithm nginx uses): deterministic, spreads picks evenly in time, and
after n picks each target's count stays close to n x share (within 1 in practice;
the tests check a bound of 2, which holds for any shares). The simulator and the runtime
both use it, so the sequence of choices is the same in virtual and real time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


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
