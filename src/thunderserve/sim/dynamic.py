"""A replay whose deployment changes in virtual time: GPUs fail, groups flip phase, load, drain or restart.

Mechanism only: `sim.timeline` decides *when* (detection, decision, apply). It drives the same group
simulators as `sim.replay` (prefill / decode / colocated groups, processor-sharing KV links, the shared
`policy` decisions) and adds a lifecycle per group object (one object per incarnation of a plan group):

    loading --(ready)--> active --(flip or drop: no new work, in-flight work finishes)--> draining --> gone
    any state --(one of its GPUs fails: it stops silently)--> dead --(the router detects it)--> swept

Request lifecycle here (the `replay` one, plus routing at arrival and retries):
    arrive -> entry router: the current plan's shares over the *available* entry groups (active, and for a
    prefill group with an available decode group); none available: the router holds it (FIFO)
    -> the `replay` lifecycle (queue -> prefill -> KV transfer -> decode -> finish).
    A request whose KV cache is lost (its group died, or a restart) goes back to the entry router and is
    prefilled again; one whose KV is still held by a live prefill group when its decode group goes away is
    re-routed to another decode group. Requests queued but not started on a group that starts draining go
    back to the router (or, for a decode group, to another decode group) at once.
Every request finishes exactly once, unless no group can ever serve it (then it stays unfinished). The first
token time is the first one the client saw: a retry does not reset it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from thunderserve.costmodel.comm import Compression
from thunderserve.costmodel.network import Topology, kv_paths
from thunderserve.plan import Group, Phase, Plan, group_perf_of
from thunderserve.policy.routing import WeightedChooser
from thunderserve.sim.config import SimConfig
from thunderserve.sim.dynamic_groups import (
    DECODE,
    DONE,
    DRAIN_POLL_S,
    ENTRY,
    HELD,
    KV,
    NEW,
    GroupState,
    _DynColocated,
    _DynDecode,
    _DynGroup,
    _DynLink,
    _DynPrefill,
)
from thunderserve.sim.kernel import PRIORITY_ARRIVAL, PRIORITY_DECIDE, EventLoop
from thunderserve.sim.network import FlowNetwork
from thunderserve.sim.replay import _DecodeSim, _PrefillSim, _Replay, _Requests, set_group_costs
from thunderserve.sim.steptime import GroupTimer
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec

__all__ = ["DECODE", "DONE", "ENTRY", "HELD", "KV", "NEW", "DynamicReplay", "GroupState"]


class DynamicReplay(_Replay):
    """Replay state plus the operations a rescheduler applies in virtual time (see module docstring).

    Built on `_Replay`'s request records and hooks (`route_kv`, `requeue`, `first_token`, `finish`); it does
    not call `_Replay.__init__`, which wires one fixed plan.
    """

    def __init__(self, cluster: Cluster, model: ModelSpec, req: _Requests, config: SimConfig = SimConfig()
                 ) -> None:
        if config.ideal_kv_links:
            raise ValueError("a changing deployment needs modelled KV links (ideal_kv_links=False)")
        self.loop = EventLoop()
        self.req = req
        self.config = config
        self.oversized = 0
        self.preemptions = 0
        self.finished = 0
        self.failures = 0
        self.stop_after = None
        self.ttft_target = math.inf
        self.tpot_target = math.inf
        self.warmup_s = config.warmup_s
        self.cluster = cluster  # every GPU that ever existed (cost models only need the GPUs to exist)
        self.topology = Topology.of(cluster)
        self.net = FlowNetwork(self.loop, self.topology.capacity_bytes_s)
        self._topology_of = cluster  # the cluster `topology` describes
        self.model = model
        self.compression: Compression | str = Compression.NONE
        n = len(req.arrival)
        self.stage = [NEW] * n
        self.holder: list[_DynGroup | None] = [None] * n  # entry (prefill/colocated) group of the request
        self.dst_obj: list[_DynGroup | None] = [None] * n  # group holding its decode (after a KV transfer)
        self.retries = [0] * n  # times its KV was lost and it started over
        self.active: set[int] = set()  # arrived, not finished
        self.held: deque[int] = deque()  # waiting at the router for an available entry group
        self.objects: dict[str, _DynGroup] = {}  # the current object of each plan group id
        self.live: list[_DynGroup] = []  # objects not gone and not swept (incl. draining ones)
        self.incarnations: list[str] = []  # group id of each object, by object index
        self.entry_chooser = WeightedChooser({})
        self.entry_ok: set[str] = set()
        self.kv_ok: set[str] = set()
        self._version = 0
        self._excl: dict[int, tuple[int, list[str]]] = {}
        self._timers: dict[Any, tuple[GroupTimer, int]] = {}
        # Groups loading weights (or waiting out a flip) get their share of new work, which queues there
        # until they serve (True), or the router spreads it over the serving groups (False).
        self.route_to_loading = True
        self.on_arrival: Callable[[int, float], None] | None = None
        self.on_finish: Callable[[int, float], None] | None = None
        self.on_state: Callable[[str, str, float], None] | None = None  # (group id, state, time)

    # -- group objects -------------------------------------------------------------------------------
    def _topology(self) -> Topology:
        """The network of the cluster as known now (nodes may have joined since it was last built)."""
        if self._topology_of is not self.cluster:
            self.topology = Topology.of(self.cluster)
            self.net.add_resources(self.topology.capacity_bytes_s)
            self._topology_of = self.cluster
        return self.topology

    def _make(self, group: Group) -> _DynGroup:
        if group.stages not in self._timers:
            perf = group_perf_of(group, self.model, self.cluster)
            self._timers[group.stages] = (GroupTimer(perf), perf.kv_capacity_tokens)
        timer, cap = self._timers[group.stages]
        idx = len(self.incarnations)
        self.incarnations.append(group.id)
        kinds: dict[Phase, type[_DynPrefill] | type[_DynDecode] | type[_DynColocated]] = {
            Phase.PREFILL: _DynPrefill, Phase.DECODE: _DynDecode, Phase.COLOCATED: _DynColocated}
        obj = kinds[group.phase](self, idx, timer, cap)
        set_group_costs(obj, group, self.model, self.cluster, self._topology(), self.compression)
        obj._init_life(group)
        self.live.append(obj)
        return obj

    def _set_state(self, obj: _DynGroup, state: GroupState) -> None:
        obj.state = state
        if state in (GroupState.GONE, GroupState.DEAD):
            self.live = [o for o in self.live if o is not obj]
        if self.on_state is not None:
            self.on_state(obj.gid, str(state), self.loop.now_s)

    def _link(self, src: _DynPrefill, dst: _DynDecode) -> None:
        if src.idx in dst.links:
            return
        stages = [([self.cluster.by_id[x] for x in s.gpus], s.num_layers) for s in src.group.stages]
        paths = kv_paths(self.model, stages, [self.cluster.by_id[x] for x in dst.group.gpus], self.cluster,
                         self._topology(), self.compression,
                         decode_stages=[([self.cluster.by_id[x] for x in d.gpus], d.num_layers)
                                        for d in dst.group.stages])
        dst.links[src.idx] = _DynLink(self, src, dst, paths)

    # -- routing ---------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Recompute which group ids the router may pick, then hand held requests out."""
        routable = (GroupState.ACTIVE, GroupState.LOADING) if self.route_to_loading else (GroupState.ACTIVE,)
        self.kv_ok = {gid for gid, o in self.objects.items()
                      if isinstance(o, _DynDecode) and o.state in routable}
        ok: set[str] = set()
        for gid, o in self.objects.items():
            if o.state not in routable:
                continue
            if isinstance(o, _DynPrefill):
                if o.chooser is None or not any(k in self.kv_ok for k in o.chooser.shares):
                    continue
            elif not isinstance(o, _DynColocated):
                continue
            ok.add(gid)
        self.entry_ok = ok
        self._version += 1
        self._flush()

    def _pick(self, chooser: WeightedChooser, ok: set[str]) -> str | None:
        key = id(chooser)
        cached = self._excl.get(key)
        if cached is None or cached[0] != self._version:
            cached = (self._version, [k for k in chooser.shares if k not in ok])
            self._excl[key] = cached
        try:
            return chooser.choose(cached[1])
        except LookupError:
            return None

    def set_routing(self, plan: Plan) -> None:
        """New routing shares for new requests (entry, and each current prefill group's KV destinations)."""
        routing = plan.routing
        assert routing is not None
        self.compression = plan.kv_transfer.compression
        self.entry_chooser.update(routing.entry)
        for gid, o in sorted(self.objects.items()):
            if isinstance(o, _DynPrefill) and o.state in (GroupState.ACTIVE, GroupState.LOADING):
                shares = routing.kv.get(gid, {})
                if o.chooser is None:
                    o.chooser = WeightedChooser(shares)
                else:
                    o.chooser.update(shares)
        self._excl.clear()
        self._refresh()

    def _dispatch(self, r: int) -> None:
        gid = self._pick(self.entry_chooser, self.entry_ok)
        if gid is None:
            self.stage[r] = HELD
            self.held.append(r)
            return
        obj = self.objects[gid]
        self.req.gen[r] = 0  # the router sends the prompt: a request preempted where it was starts over
        self.stage[r] = ENTRY
        self.holder[r] = obj
        self.dst_obj[r] = None
        self.req.entry[r] = obj.idx
        assert isinstance(obj, _DynPrefill | _DynColocated)
        obj.arrive(r)

    def _flush(self) -> None:
        if not self.held or not any(k in self.entry_ok for k in self.entry_chooser.shares):
            return
        for _ in range(len(self.held)):
            self._dispatch(self.held.popleft())

    def route_kv(self, src: _PrefillSim, r: int) -> _DecodeSim | None:
        assert isinstance(src, _DynPrefill)
        gid = self._pick(src.chooser, self.kv_ok) if src.chooser is not None else None
        if gid is None:
            return None
        dst = self.objects[gid]
        assert isinstance(dst, _DynDecode)
        self._link(src, dst)
        self.stage[r] = KV
        self.dst_obj[r] = dst
        return dst

    def requeue(self, r: int) -> None:
        self._start_over([r])

    def _start_over(self, rids: Iterable[int]) -> None:
        """Requests whose KV is gone: back to the entry router, prefill again."""
        req = self.req
        for r in rids:
            self.retries[r] += 1
            req.gen[r] = 0  # its KV is gone: the retry starts from the prompt
            self.holder[r] = None
            self.dst_obj[r] = None
            req.src[r] = None
            req.decode[r] = -1
            self.stage[r] = NEW
            self.loop.schedule(self.loop.now_s, PRIORITY_ARRIVAL, self._dispatch, r)

    # -- records ---------------------------------------------------------------------------------------
    def first_token(self, r: int, now: float) -> None:
        if math.isnan(self.req.first[r]):
            self.req.first[r] = now

    def finish(self, r: int, now: float) -> None:
        req = self.req
        if not math.isnan(req.finish[r]):
            raise RuntimeError(f"request {r} finished twice")
        req.finish[r] = now
        self.finished += 1
        self.active.discard(r)
        self.stage[r] = DONE
        if self.on_finish is not None:
            self.on_finish(r, now)

    def rebalance(self) -> int:
        """Requests queued at serving entry groups but not started go back to the router, which hands them
        out again by the current shares, oldest first (after a re-route, a backlog the old shares piled on
        one group is spread by the new ones instead of waiting there). Returns how many moved."""
        back: list[int] = []
        for _, o in sorted(self.objects.items()):
            if o.dead or o.state is not GroupState.ACTIVE:
                continue
            if isinstance(o, _DynPrefill):
                back += o.queue
                o.queue.clear()
            elif isinstance(o, _DynColocated):
                back += o.waiting
                o.waiting.clear()
        for r in sorted(back, key=lambda r: (self.req.arrival[r], r)):
            self._dispatch(r)
        return len(back)

    def progress(self) -> dict[int, int]:
        """Tokens each unfinished request has produced so far, as a client (or the router) sees them: the
        first token after prefill, one per decode step since it joined a batch. Requests with no token yet
        are absent. (A sequence that joined a batch at step s0 finishes at step s0 + output - 2; the count is
        step - s0 + 1.)"""
        req = self.req
        out: dict[int, int] = {}
        for o in self.live:
            if isinstance(o, _DynPrefill) or o.dead:
                continue
            step = o.step_idx
            for r, (_, _, end) in o.info.items():
                out[r] = req.output[r] - 1 - (end - step)
        for r in self.active:
            if r not in out and not math.isnan(req.first[r]):
                out[r] = 1
        return out

    # -- operations a rescheduler applies --------------------------------------------------------------
    def install(self, plan: Plan, ready_at_s: float | None = None) -> None:
        """Start every group of `plan` (active now, or loading until `ready_at_s`) with its routing."""
        self.compression = plan.kv_transfer.compression  # before the groups: it sets their codec cost
        objs = []
        for g in plan.groups:
            obj = self._make(g)
            self.objects[g.id] = obj
            objs.append(obj)
        self.set_routing(plan)
        if ready_at_s is None or ready_at_s <= self.loop.now_s:
            for o in objs:
                self._activate(o)
        else:
            self.loop.schedule(ready_at_s, PRIORITY_DECIDE, self._activate_all, objs)

    def _activate_all(self, objs: list[_DynGroup]) -> None:
        for o in objs:
            self._activate(o)

    def _activate(self, obj: _DynGroup) -> None:
        if obj.dead or obj.state is not GroupState.LOADING:
            return
        self._set_state(obj, GroupState.ACTIVE)
        self._refresh()
        obj.on_active()

    def fail_gpus(self, gpu_ids: Iterable[str]) -> list[str]:
        """GPUs stop: every group object using one stops silently (the router learns at `sweep`)."""
        ids = set(gpu_ids)
        hit = []
        for o in self.live:
            if not o.dead and ids & set(o.group.gpus):
                o.dead = True
                hit.append(o.gid)
        return sorted(hit)

    def dead_groups(self) -> list[str]:
        """Ids of group objects that stopped but are not swept yet."""
        return sorted({o.gid for o in self.live if o.dead})

    def sweep(self, gpu_ids: set[str] | None = None) -> tuple[int, int]:
        """The router learns which groups are dead (those on `gpu_ids`, default all stopped ones): exclude
        them, re-route KV still held by live prefill groups, start over the requests whose KV died.
        Returns (started over, re-routed)."""
        dead = [o for o in self.live if o.dead and (gpu_ids is None or gpu_ids & set(o.group.gpus))]
        if not dead:
            return 0, 0
        dead_ids = {id(o) for o in dead}
        for o in dead:
            if self.objects.get(o.gid) is o:
                del self.objects[o.gid]
            self._set_state(o, GroupState.DEAD)
        self._refresh()
        lost: list[int] = []
        moved: list[int] = []
        touched: dict[int, _DynDecode] = {}
        for r in sorted(self.active):
            st = self.stage[r]
            h = self.holder[r]
            d = self.dst_obj[r]
            if h is not None and id(h) in dead_ids and st in (ENTRY, KV):
                lost.append(r)
                if st == KV and d is not None and id(d) not in dead_ids:
                    assert isinstance(d, _DynDecode)  # a KV transfer only ever targets a decode group
                    self._cancel_at(d, r)
                    touched[d.idx] = d
            elif d is not None and id(d) in dead_ids:
                if st == KV:
                    moved.append(r)
                elif st == DECODE:
                    lost.append(r)
        for d in touched.values():
            for o in dead:
                d.links.pop(o.idx, None)
        self._reroute(moved, lost)
        for idx in sorted(touched):
            touched[idx].try_admit()
        self._start_over(lost)
        return len(lost), len(moved)

    def _cancel_at(self, dst: _DynDecode, r: int) -> None:
        """Forget request r at decode group `dst` (its KV source died): waiting, or on the dead link."""
        try:
            dst.pending.remove(r)
            return
        except ValueError:
            pass
        dst.inflight -= 1
        dst.release(r)

    def _reroute(self, rids: list[int], lost: list[int]) -> None:
        """Requests whose KV is still at their live prefill group: to another decode group, or start over."""
        touched: dict[int, _DecodeSim] = {}
        for r in rids:
            src = self.req.src[r]
            if src is None:  # preempted at its decode group: its KV is gone
                lost.append(r)
                continue
            assert isinstance(src, _DynPrefill)
            dst = self.route_kv(src, r)
            if dst is None:
                src.release_kv(self.req.prompt[r])
                lost.append(r)
                continue
            self.req.decode[r] = dst.idx
            dst.pending.append(r)
            touched[dst.idx] = dst
        for idx in sorted(touched):
            touched[idx].try_admit()

    def flip(self, group: Group, drain_s: float) -> None:
        """`group` (same GPUs and layout, new phase) replaces the current object of its id. The old object
        takes no new work at once (its queued, unstarted requests go back to the router) and the new one
        serves after `drain_s`, and after the old one's in-flight work allows:
          decode <-> colocated: the running decode batch is handed over (same KV cache) once no KV transfer
            into the old group / no prompt prefill in it is unfinished;
          prefill -> decode/colocated: once no prefill batch runs; KV the old role still holds (waiting to
            be transferred) is memory the new role gets back as it leaves;
          decode/colocated -> prefill: once every running sequence finished (a full drain).
        Flipping a group whose previous flip is still pending replaces that pending role: the new one waits
        for what the GPUs still run."""
        old, ready_at = self._replace(group, drain_s)
        new = self.objects[group.id]
        if old is None:
            self._ready_after(new, ready_at)
            return
        self._stop_new_work(old)
        if isinstance(old, _DynPrefill) and not isinstance(new, _DynPrefill):
            if not old.polled:
                self._poll_drain(old, lambda: None)
            self.loop.schedule(ready_at, PRIORITY_DECIDE, lambda _: self._inherit_kv(old, new), None)
        elif not isinstance(old, _DynPrefill) and not isinstance(new, _DynPrefill):
            self.loop.schedule(ready_at, PRIORITY_DECIDE, lambda _: self._due(old, new), None)
        else:
            self._poll_drain(old, lambda: self._ready_after(new, ready_at))

    def load(self, group: Group, load_s: float) -> None:
        """`group` (a new layout) starts loading its weights; it is ready after `load_s` (and after the old
        object of its id, if alive, drained)."""
        old, ready_at = self._replace(group, load_s)
        new = self.objects[group.id]
        if old is None:
            self._ready_after(new, ready_at)
            return
        self._stop_new_work(old)
        self._poll_drain(old, lambda: self._ready_after(new, ready_at))

    def _replace(self, group: Group, delay_s: float) -> tuple[_DynGroup | None, float]:
        """Make `group`'s new object (loading); return the object still running on its GPUs (None: none)
        and the earliest time the new one may serve."""
        old = self.objects.get(group.id)
        ready_at = self.loop.now_s + delay_s
        if old is not None and not old.dead and old.state is GroupState.LOADING:
            # It never served: it gives way, its queued work goes back; its wait becomes the new one's.
            self._take_back(old)
            self._set_state(old, GroupState.GONE)
            ready_at = max(ready_at, old.ready_at_s)
            old = old.pred
        if old is not None and (old.dead or old.state is GroupState.GONE):
            old = None
        new = self._make(group)
        new.pred = old
        new.ready_at_s = ready_at
        self.objects[group.id] = new
        if old is not None:
            old.successor = None  # a hand-over due to the replaced role is off; the caller decides anew
        return old, ready_at

    def drop(self, gid: str) -> None:
        """Group `gid` leaves the plan: it drains and goes."""
        old = self.objects.pop(gid, None)
        if old is not None and not old.dead:
            if old.state is GroupState.LOADING:
                self._take_back(old)
                self._set_state(old, GroupState.GONE)
            else:
                self._stop_new_work(old)
                self._poll_drain(old, lambda: None)
        self._refresh()

    def _due(self, old: _DynGroup, new: _DynGroup) -> None:
        assert isinstance(old, _DynDecode | _DynColocated)
        if old.dead or new.dead or new.state is not GroupState.LOADING or old.state is GroupState.GONE:
            return
        old.successor = new
        if not old.stepping:  # idle: decide now (as an arrival would wake it)
            old.stepping = True
            old._step_start(None)

    def _inherit_kv(self, old: _DynPrefill, new: _DynGroup) -> None:
        if old.dead or new.dead or new.state is not GroupState.LOADING:
            return
        if old.computing():
            self.loop.schedule(self.loop.now_s + DRAIN_POLL_S, PRIORITY_DECIDE,
                               lambda _: self._inherit_kv(old, new), None)
            return
        if old.kv_used > 0:
            new.kv_cap -= old.kv_used
            old.kv_heir = new
        self._activate(new)

    def _ready_after(self, obj: _DynGroup, at_s: float) -> None:
        self.loop.schedule(max(at_s, self.loop.now_s), PRIORITY_DECIDE, lambda _: self._activate(obj), None)

    def _stop_new_work(self, obj: _DynGroup) -> None:
        """The group stops taking work of its role (idempotent): draining, its unstarted requests go back."""
        if obj.state is not GroupState.DRAINING:
            self._set_state(obj, GroupState.DRAINING)
            self._refresh()
        self._take_back(obj)

    def _take_back(self, obj: _DynGroup) -> None:
        """Requests queued at the group but not started: back to the router (decode: to another decode group)."""
        if isinstance(obj, _DynPrefill):
            back = list(obj.queue)
            obj.queue.clear()
            for r in back:
                self._dispatch(r)
        elif isinstance(obj, _DynColocated):
            back = list(obj.waiting)
            obj.waiting.clear()
            for r in back:
                self._dispatch(r)
        else:
            back = list(obj.pending)
            obj.pending.clear()
            lost: list[int] = []
            self._reroute(back, lost)
            self._start_over(lost)

    def _poll_drain(self, obj: _DynGroup, then: Callable[[], None]) -> None:
        obj.polled = True
        if obj.dead:
            return
        if obj.drained():
            if obj.state is not GroupState.GONE:
                self._set_state(obj, GroupState.GONE)
            then()
            return
        self.loop.schedule(self.loop.now_s + DRAIN_POLL_S, PRIORITY_DECIDE,
                           lambda _: self._poll_drain(obj, then), None)

    def stop_all(self) -> int:
        """Every group stops at once (a restart): all in-flight requests start over. Returns how many."""
        for o in self.live:
            o.dead = True
        lost, _ = self.sweep()
        return lost

    def group_states(self) -> Mapping[str, str]:
        return {gid: str(o.state) for gid, o in sorted(self.objects.items())}

    # -- driver ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Schedule the arrivals (call `install` first); then `loop.run()`."""
        arrival = self.req.arrival
        n = len(arrival)
        if n == 0:
            return
        loop = self.loop

        def arrive(r: int) -> None:
            self.active.add(r)
            if self.on_arrival is not None:
                self.on_arrival(r, loop.now_s)
            self._dispatch(r)
            if r + 1 < n:
                loop.schedule(arrival[r + 1], PRIORITY_ARRIVAL, arrive, r + 1)

        loop.schedule(arrival[0], PRIORITY_ARRIVAL, arrive, 0)
