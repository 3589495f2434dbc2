"""Group objects of a changing deployment (`sim.dynamic`): the `replay` group simulators plus a lifecycle.

    loading --(ready)--> active --(flip or drop: no new work, in-flight work finishes)--> draining --> gone
    any state --(one of its GPUs fails: it stops silently)--> dead --(the router detects it)--> swept

A stopped ("dead") object ignores its scheduled events; a loading one queues work until it serves; a flip
between decode and colocated hands the running decode batch to the successor (`hand_over`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from thunderserve.plan import Group
from thunderserve.sim.kernel import PRIORITY_DECIDE
from thunderserve.sim.replay import _ColocatedSim, _DecodeSim, _Link, _PrefillSim

if TYPE_CHECKING:
    from thunderserve.sim.dynamic import DynamicReplay

DRAIN_POLL_S = 0.1  # how often a draining group is checked for having finished its in-flight work

# Where a request is (per request, `DynamicReplay.stage`).
NEW, HELD, ENTRY, KV, DECODE, DONE = range(6)


class GroupState(StrEnum):
    LOADING = "loading"  # weights loading / waiting for its predecessor on the same GPUs to drain
    ACTIVE = "active"
    DRAINING = "draining"  # takes no new work; finishes what it holds
    GONE = "gone"  # drained and removed
    DEAD = "dead"  # its GPUs failed (or it was stopped by a restart) and the router knows


class _Life:
    """Lifecycle fields shared by the group objects of a changing deployment."""

    group: Group
    state: GroupState
    dead: bool  # stopped (failed GPUs or a restart): its scheduled events are ignored
    successor: _DynGroup | None  # a flip is due: hand the running decode batch to it at a step boundary
    kv_heir: _DynGroup | None  # a flipped prefill group's successor: gets KV memory back as it is released
    pred: _DynGroup | None  # loading: the object still running on the same GPUs (draining), if any
    ready_at_s: float  # loading: earliest time it may serve
    polled: bool  # a drain poll runs (or ran) for it

    def _init_life(self, group: Group) -> None:
        self.group = group
        self.state = GroupState.LOADING
        self.dead = False
        self.successor = None
        self.kv_heir = None
        self.pred = None
        self.ready_at_s = 0.0
        self.polled = False

    @property
    def gid(self) -> str:
        return self.group.id


class _DynPrefill(_PrefillSim, _Life):
    def _decide(self, arg: object) -> None:
        if self.dead:
            return
        if self.state is GroupState.LOADING:  # work queues until the group serves
            self.deciding = False
            return
        super()._decide(arg)

    def on_active(self) -> None:
        if self.queue and not self.deciding:
            self._wake()

    def _batch_done(self, rids: list[int]) -> None:
        if not self.dead:
            super()._batch_done(rids)

    def release_kv(self, tokens: int) -> None:
        super().release_kv(tokens)
        heir = self.kv_heir
        if heir is not None and not heir.dead:
            heir.kv_cap += tokens
            heir.kv_grew()

    def computing(self) -> bool:
        """A prefill batch is still running on some stage."""
        return max(self.stage_free_s) > self.sim.loop.now_s

    def drained(self) -> bool:
        return not self.queue and self.kv_used <= 0

    def kv_grew(self) -> None:
        if self.queue and not self.deciding:
            self._wake()


class _DynDecode(_DecodeSim, _Life):
    def try_admit(self) -> None:
        if not self.dead and self.state is not GroupState.LOADING:
            super().try_admit()

    def on_active(self) -> None:
        self.try_admit()

    def transfer_done(self, r: int) -> None:
        sim: DynamicReplay = self.sim  # type: ignore[assignment]
        sim.stage[r] = DECODE
        sim.req.src[r] = None  # the KV left the prefill group: its failure no longer concerns r
        super().transfer_done(r)

    def _step_start(self, arg: object) -> None:
        if self.dead:
            return
        if self.successor is not None and self.inflight == 0 and not self.joining and not self.recompute:
            hand_over(self)
            return
        super()._step_start(arg)

    def _step_end(self, arg: tuple[bool, list[int]]) -> None:
        if not self.dead:
            super()._step_end(arg)

    def drained(self) -> bool:
        return not self.pending and self.used_blocks <= 0

    def kv_grew(self) -> None:
        self.try_admit()


class _DynColocated(_ColocatedSim, _Life):
    def on_active(self) -> None:
        self.kv_grew()

    def _step_start(self, arg: object) -> None:
        if self.dead:
            return
        if self.state is GroupState.LOADING:  # work queues until the group serves
            self.stepping = False
            return
        if self.successor is not None and not self.prefilling:
            hand_over(self)
            return
        super()._step_start(arg)

    def _step_end(self, arg: object) -> None:
        if not self.dead:
            super()._step_end(arg)

    def drained(self) -> bool:
        return not self.waiting and not self.prefilling and self.used_blocks <= 0

    def kv_grew(self) -> None:
        if self.waiting and not self.stepping:
            self.stepping = True
            loop = self.sim.loop
            loop.schedule(loop.now_s, PRIORITY_DECIDE, self._step_start, None)


_DynGroup = _DynPrefill | _DynDecode | _DynColocated
_BATCH_STATE = ("used_blocks", "running", "ctx", "step_idx", "fin", "info", "bucket", "adm", "stack", "seq")


def hand_over(old: _DynDecode | _DynColocated) -> None:
    """A flip between decode and colocated keeps the running decode batch (same GPUs, same KV cache): at a
    step boundary, once no KV transfer into it (decode) or prompt prefill in it (colocated) is unfinished."""
    new = old.successor
    assert isinstance(new, _DynDecode | _DynColocated) and new.state is GroupState.LOADING
    sim: DynamicReplay = old.sim  # type: ignore[assignment]
    old.successor = None
    for attr in _BATCH_STATE:
        setattr(new, attr, getattr(old, attr))
    old.fin, old.running, old.used_blocks, old.ctx = [], 0, 0, 0
    old.info, old.bucket, old.adm, old.stack = {}, [0] * len(old.bucket), {}, []
    old.stepping = False
    for r in sorted(sim.active):
        if sim.dst_obj[r] is old or (sim.holder[r] is old and sim.stage[r] == ENTRY):
            sim.dst_obj[r] = new
            sim.stage[r] = DECODE
    sim._set_state(old, GroupState.GONE)
    sim._activate(new)
    if new.running and not new.stepping:
        new.stepping = True
        loop = sim.loop
        loop.schedule(loop.now_s, PRIORITY_DECIDE, new._step_start, None)


class _DynLink(_Link):
    def _transfer_done(self, r: int) -> None:
        if not (self.src.dead or self.dst.dead):  # type: ignore[attr-defined]
            super()._transfer_done(r)
