"""Replay a request stream against a Plan on a Cluster in virtual time.

Request lifecycle (this module implements it; `policy.step` and `policy.kv_blocks` make every decision):
    arrive -> routed to a prefill/colocated group by `routing.entry` (WeightedChooser)
    -> FIFO queue -> prefill batch (token budget; KV of the batch must fit in the group's free KV memory)
    -> first token (TTFT ends here)
    [disaggregated]  -> routed to a decode group by `routing.kv[p]` -> waits in the decode group's FIFO until
                        admitted (allocates the prompt's KV blocks there) -> KV transfer: one flow per
                        prefill stage in the shared network (`sim.network`: NICs, zone paths and links are
                        shared max-min fairly by every concurrent transfer; the prefill group keeps the KV
                        until the transfer ends, DistServe's pull model) -> joins the running batch
                        (compressed KV: the prefill stages quantise after their pass, which occupies them
                        and delays the KV's departure; the decode step it joins first dequantises it)
    [colocated]      -> admitted by its prompt's KV blocks, prefilled in chunks inside decode steps
                        (or whole, prefill-first), then decodes in the same group
    -> continuous-batching decode steps, one token per running sequence per step, a new KV block every 16
       tokens -> finish (blocks freed).
    When a step's new blocks do not fit, the latest-admitted running request is preempted (vLLM v1): blocks
    freed, back to the front of its group's queue, later prefilled again over prompt + generated tokens
    (`sim.decode_loop`). Admission never reads a request's output length.
Requests are never dropped: when KV memory is full they wait (backpressure up to the prefill queue).

Cost per event, not per token: a decode step is one event per group; per-request finishes come from a heap
keyed by the step index at which they end; the context held by a batch is a running sum.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice

import numpy as np

from thunderserve.costmodel.comm import SEND_LATENCY_S, Compression
from thunderserve.costmodel.kv import codec_seconds_per_token
from thunderserve.costmodel.network import Path, Topology, kv_paths
from thunderserve.plan import Group, Phase, Plan, group_perf_of, validate_plan
from thunderserve.policy.kv_blocks import BLOCK_TOKENS, blocks_for
from thunderserve.policy.routing import Dispatch, LeastOutstandingChooser, WeightedChooser
from thunderserve.policy.step import ColocatedPolicy, colocated_step, decode_admissions, prefill_batch_size
from thunderserve.sim.config import SimConfig
from thunderserve.sim.decode_loop import _DecodeLoop
from thunderserve.sim.kernel import PRIORITY_ARRIVAL, PRIORITY_COMPLETE, PRIORITY_DECIDE, EventLoop
from thunderserve.sim.network import FlowNetwork
from thunderserve.sim.steptime import GroupTimer
from thunderserve.spec.cluster import Cluster
from thunderserve.spec.model import ModelSpec
from thunderserve.spec.slo import SloSpec

_NAN = float("nan")


@dataclass(frozen=True)
class SimResult:
    """Per-request records (numpy arrays, one entry per request in arrival order) and run facts."""

    group_ids: tuple[str, ...]
    arrival_s: np.ndarray
    first_token_s: np.ndarray  # NaN if the run was stopped before it
    finish_s: np.ndarray  # NaN if the run was stopped before it
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    entry_group: np.ndarray  # index into group_ids of the prefill/colocated group
    decode_group: np.ndarray  # index of the decode group, -1 when none (colocated or single-token output)
    warmup_s: float  # requests arriving before this are not measured
    completed: bool  # False when stopped early (the SLO was already certainly missed)
    oversized_requests: int  # requests that ran alone over-committing a group's KV memory
    end_s: float  # virtual time of the last event
    events: int
    wall_s: float
    preemptions: int = 0  # times a running request was preempted (KV blocks freed, recomputed later)

    @property
    def num_requests(self) -> int:
        return int(self.arrival_s.size)

    @property
    def measured(self) -> np.ndarray:
        return self.arrival_s >= self.warmup_s

    @property
    def ttft_s(self) -> np.ndarray:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> np.ndarray:
        """Mean time per output token after the first (0 for single-token outputs)."""
        steps = np.maximum(self.output_tokens - 1, 1)
        return np.where(self.output_tokens > 1, (self.finish_s - self.first_token_s) / steps, 0.0)

    @property
    def e2e_s(self) -> np.ndarray:
        return self.finish_s - self.arrival_s


class _Stop(Exception):
    pass


def _head(queue: deque[int], sizes: list[int], limit: float, max_n: int) -> list[int]:
    """Sizes of the queue's FIFO head while their running total stays within `limit`, plus the first one past
    it (the policy must see the request that does not fit). Every FIFO-prefix policy decides the same on this
    head as on the whole queue; it only saves building long lists when the queue is long."""
    out: list[int] = []
    total = 0
    for r in islice(queue, max_n):
        s = sizes[r]
        out.append(s)
        total += s
        if total > limit:
            break
    return out


class _Requests:
    """Per-request state as flat Python lists (fast scalar access); exported to numpy at the end."""

    def __init__(self, arrival_s: np.ndarray, prompt: np.ndarray, output: np.ndarray) -> None:
        self.arrival = arrival_s.astype(float).tolist()
        self.prompt = prompt.astype(np.int64).tolist()
        self.output = np.maximum(output.astype(np.int64), 1).tolist()
        n = len(self.prompt)
        self.gen = [0] * n  # tokens produced before the request's last preemption (recomputed with the prompt)
        self.first = [_NAN] * n
        self.finish = [_NAN] * n
        self.entry = [-1] * n
        self.decode = [-1] * n
        self.src: list[_PrefillSim | None] = [None] * n


class _Link:
    """KV transfers from one prefill group to one decode group: each request's streams (one per prefill stage,
    `costmodel.network.kv_paths`) are flows in the simulation's shared network (`sim.network`); the request's
    KV has arrived when its last stream ends."""

    __slots__ = ("sim", "src", "dst", "paths", "left")

    def __init__(self, sim: _Replay, src: _PrefillSim, dst: _DecodeSim, paths: list[Path]) -> None:
        self.sim, self.src, self.dst, self.paths = sim, src, dst, paths
        self.left: dict[int, int] = {}  # request -> streams still in flight

    def start(self, r: int, tokens: int) -> None:
        sim = self.sim
        if sim.config.ideal_kv_links or not self.paths:
            sim.loop.schedule(sim.loop.now_s, PRIORITY_COMPLETE, self._transfer_done, r)
            return
        self.left[r] = len(self.paths)
        net = sim.net
        for p in self.paths:
            net.start(p.resources, p.cap_bytes_s, p.nbytes(tokens), self._stream_done, r)

    def _stream_done(self, r: int) -> None:
        n = self.left[r] - 1
        if n:
            self.left[r] = n
            return
        del self.left[r]
        sim = self.sim
        # message latency, and the prefill GPUs' quantise of this prompt before its KV could leave
        delay = SEND_LATENCY_S + self.src.quantise_s_per_token * sim.req.prompt[r]
        sim.loop.schedule(sim.loop.now_s + delay, PRIORITY_COMPLETE, self._transfer_done, r)

    def _transfer_done(self, r: int) -> None:
        self.src.release_kv(self.sim.req.prompt[r])
        self.dst.transfer_done(r)


class _PrefillSim:
    """A prefill-only group: batches under a token budget, pipelined stage by stage with PP."""

    def __init__(self, sim: _Replay, idx: int, timer: GroupTimer, kv_capacity_tokens: int) -> None:
        self.sim = sim
        self.idx = idx
        self.timer = timer
        self.kv_cap = kv_capacity_tokens
        self.kv_used = 0  # prompts being prefilled or waiting for their KV to leave
        self.queue: deque[int] = deque()
        self.next_start_s = 0.0
        self.stage_free_s = [0.0] * timer.pp
        self.deciding = False
        self.chooser: WeightedChooser | None = None
        self.lor: LeastOutstandingChooser | None = None  # with load-aware dispatch
        self.quantise_s_per_token = 0.0  # KV compression: GPU time per prompt token (costmodel.kv.codec_...)
        self.pp_send_resources: list[tuple[str, ...]] = []  # network resources each pipeline send crosses
        self.dest: dict[str, _DecodeSim] = {}

    def arrive(self, r: int) -> None:
        self.queue.append(r)
        if not self.deciding:
            self._wake()

    def release_kv(self, tokens: int) -> None:
        self.kv_used -= tokens
        if not self.deciding and self.queue:
            self._wake()

    def _wake(self) -> None:
        loop = self.sim.loop
        self.deciding = True
        loop.schedule(max(loop.now_s, self.next_start_s), PRIORITY_DECIDE, self._decide, None)

    def _decide(self, _: object) -> None:
        self.deciding = False
        q = self.queue
        if not q:
            return
        sim = self.sim
        prompt = sim.req.prompt
        cfg = sim.config.batching
        heads = _head(q, prompt, min(self.kv_cap - self.kv_used, cfg.prefill_token_budget), cfg.max_batch_size)
        n = prefill_batch_size(heads, self.kv_cap - self.kv_used, self.kv_cap, cfg)
        if n == 0:
            return  # KV memory full: a transfer completing wakes us
        rids = [q.popleft() for _ in range(n)]
        total = sum(heads[:n])
        if total > self.kv_cap:
            sim.oversized += 1
        self.kv_used += total
        stage_s, send_s = self.timer.prefill_stage_times_s(float(total), float(sum(p * p for p in heads[:n])),
                                                           float(n))
        now = sim.loop.now_s
        t = now
        if self.pp_send_resources:  # a send takes its share of what concurrent KV transfers leave
            net, caps = sim.net, self.timer.send_bytes_s
            send_s = [x * net.slowdown(res, cap) for x, res, cap in zip(send_s, self.pp_send_resources, caps,
                                                                         strict=False)]
        free = self.stage_free_s
        last = len(stage_s) - 1
        code_s = self.quantise_s_per_token * total  # each stage quantises its layers' KV after its pass
        for k, dt in enumerate(stage_s):
            t = max(t, free[k]) + dt
            free[k] = t + code_s
            if k < last:
                t += send_s[k]
        sim.loop.schedule(t, PRIORITY_COMPLETE, self._batch_done, rids)
        self.next_start_s = now + max(stage_s) + code_s
        if q:
            self._wake()

    def _batch_done(self, rids: list[int]) -> None:
        sim = self.sim
        req = sim.req
        now = sim.loop.now_s
        touched: dict[int, _DecodeSim] = {}
        freed = 0
        for r in rids:
            sim.first_token(r, now)
            if req.output[r] == 1:
                freed += req.prompt[r]
                sim.finish(r, now)
                continue
            dst = sim.route_kv(self, r)
            if dst is None:  # no decode group can take it (only in a changing deployment): start over
                freed += req.prompt[r]
                sim.requeue(r)
                continue
            req.decode[r] = dst.idx
            req.src[r] = self
            dst.pending.append(r)
            touched[dst.idx] = dst
        for idx in sorted(touched):
            touched[idx].try_admit()
        if freed:
            self.release_kv(freed)


class _DecodeSim(_DecodeLoop):
    """A decode-only group: admits transferred requests into continuous batching; a preempted request is
    recomputed here (its prompt and generated tokens prefilled inside the next step), as a vLLM decode
    instance does."""

    def __init__(self, sim: _Replay, idx: int, timer: GroupTimer, kv_capacity_tokens: int) -> None:
        super().__init__(sim, idx, timer, kv_capacity_tokens)
        self.pending: deque[int] = deque()  # prefilled (or preempted here), waiting for KV blocks
        self.inflight = 0  # admitted, KV on the wire
        self.joining: list[int] = []  # transferred, join at the next step
        self.recompute: list[int] = []  # preempted and re-admitted: prefilled again in the next step
        self.links: dict[int, _Link] = {}  # by prefill group index
        self.dequantise_s_per_token = 0.0  # KV compression: GPU time per prompt token joining

    def try_admit(self) -> None:
        pend = self.pending
        if not pend:
            return
        sim = self.sim
        req = sim.req
        cfg = sim.config.batching
        active = self.running + len(self.joining) + self.inflight + len(self.recompute)
        room = cfg.max_batch_size - active
        if room <= 0:
            return
        free = self.free_blocks * BLOCK_TOKENS
        heads = _block_heads(pend, self.prefill_tokens, free, room)
        n = decode_admissions(heads, free, self.total_blocks * BLOCK_TOKENS, active, cfg)
        for _ in range(n):
            r = pend.popleft()
            self.admit(r)
            if req.gen[r]:
                self.recompute.append(r)
                self._wake()
                continue
            self.inflight += 1
            src = req.src[r]
            assert src is not None
            self.links[src.idx].start(r, req.prompt[r])

    def _wake(self) -> None:
        if not self.stepping:
            self.stepping = True
            loop = self.sim.loop
            loop.schedule(loop.now_s, PRIORITY_DECIDE, self._step_start, None)

    def transfer_done(self, r: int) -> None:
        self.inflight -= 1
        self.joining.append(r)
        self._wake()

    def is_prefilling(self, r: int) -> bool:
        return r in self.recompute

    def preemptible(self) -> int:
        return self.running + len(self.recompute)

    def keep_one(self) -> bool:
        return self.inflight == 0  # a KV cache on the wire will join and decode even if all are preempted

    def drop_prefill(self, r: int) -> None:
        self.recompute.remove(r)
        self.pending.appendleft(r)

    def requeue_front(self, r: int) -> None:
        self.pending.appendleft(r)

    def _step_start(self, _: object) -> None:
        code_s = 0.0
        if self.joining:
            prompt = self.sim.req.prompt
            for r in self.joining:
                self.join(r)
                code_s += prompt[r]
            code_s *= self.dequantise_s_per_token  # the joining caches are dequantised first
            self.joining.clear()
        if self.running:
            self.grow()
        if self.running == 0 and not self.recompute:
            self.stepping = False
            return
        loop = self.sim.loop
        if self.recompute:
            redo = list(self.recompute)
            self.recompute.clear()
            chunks = [self.prefill_tokens(r) for r in redo]
            dt = self.timer.mixed_step_s(self.running, float(self.ctx), chunks, [0] * len(chunks), len(chunks))
        else:
            redo = []
            dt = self.timer.decode_step_s(self.running, self.ctx)
        loop.schedule(loop.now_s + code_s + dt, PRIORITY_COMPLETE, self._step_end, (self.running > 0, redo))

    def _step_end(self, arg: tuple[bool, list[int]]) -> None:
        decoded, redo = arg
        freed = self.end_decode_step() if decoded else False
        for r in redo:
            freed |= _prefilled(self, r)
        if freed:
            self.try_admit()
        self._step_start(None)


def _block_heads(queue: deque[int], tokens_of: Callable[[int], int], limit: float, max_n: int) -> list[int]:
    """`_head` over the block-rounded prefill tokens of the queued requests."""
    out: list[int] = []
    total = 0
    for r in islice(queue, max_n):
        s = blocks_for(tokens_of(r)) * BLOCK_TOKENS
        out.append(s)
        total += s
        if total > limit:
            break
    return out


def _prefilled(group: _DecodeLoop, r: int) -> bool:
    """Request r's prefill (or recompute) on `group` ended: first token (unless recomputed), then it joins the
    batch or, with no token left to produce, finishes. Returns whether KV memory was freed."""
    sim = group.sim
    req = sim.req
    now = sim.loop.now_s
    if req.gen[r] == 0:
        sim.first_token(r, now)
    if req.output[r] - req.gen[r] <= 1:
        group.release(r)
        sim.finish(r, now)
        return True
    group.join(r)
    return False


class _ColocatedSim(_DecodeLoop):
    """A group running both phases: chunked prefill inside decode steps, or prefill-first."""

    def __init__(self, sim: _Replay, idx: int, timer: GroupTimer, kv_capacity_tokens: int) -> None:
        super().__init__(sim, idx, timer, kv_capacity_tokens)
        self.waiting: deque[int] = deque()
        self.prefilling: deque[list[int]] = deque()  # [request, prompt tokens left, prompt tokens done]

    def arrive(self, r: int) -> None:
        self.waiting.append(r)
        if not self.stepping:
            self.stepping = True
            loop = self.sim.loop
            loop.schedule(loop.now_s, PRIORITY_DECIDE, self._step_start, None)

    def is_prefilling(self, r: int) -> bool:
        return r in self.adm and r not in self.info

    def preemptible(self) -> int:
        return self.running + len(self.prefilling)

    def drop_prefill(self, r: int) -> None:
        e = self.prefilling.pop()  # the latest admitted is the last one being prefilled
        assert e[0] == r
        self.waiting.appendleft(r)

    def requeue_front(self, r: int) -> None:
        self.waiting.appendleft(r)

    def _step_start(self, _: object) -> None:
        sim = self.sim
        cfg = sim.config.batching
        # chunked: the running decodes are scheduled (blocks allocated, preempting if need be) before admission,
        # as vLLM v1 does; prefill-first: blocks are allocated only for a step that decodes
        chunked = sim.config.colocated_policy == ColocatedPolicy.CHUNKED
        preempted = self.grow() if self.running and chunked else False
        waiting = self.waiting
        look = 0 if preempted else max(cfg.max_batch_size - self.running - len(self.prefilling), 0)
        free = self.free_blocks * BLOCK_TOKENS
        reserve_heads = _block_heads(waiting, self.prefill_tokens, free, look)
        prompt_heads = [self.prefill_tokens(r) for r in islice(waiting, len(reserve_heads))]
        remaining = [e[1] for e in islice(self.prefilling, cfg.chunk_token_budget)]
        step = colocated_step(sim.config.colocated_policy, self.running, remaining, prompt_heads, reserve_heads,
                              free, self.total_blocks * BLOCK_TOKENS, cfg)
        if step.idle:
            self.stepping = False
            return
        if step.decode and not chunked:
            self.grow()
        for _ in range(step.admit):
            r = waiting.popleft()
            self.prefilling.append([r, self.admit(r), 0])
        chunks = step.prefill_chunks
        entries = list(islice(self.prefilling, len(chunks)))
        done = [e[2] for e in entries]
        completing = sum(1 for e, c in zip(entries, chunks, strict=True) if e[1] == c)
        b, ctx = (self.running, self.ctx) if step.decode else (0, 0)
        if chunks:
            dt = self.timer.mixed_step_s(b, float(ctx), chunks, done, completing)
        else:
            dt = self.timer.decode_step_s(b, float(ctx))
        loop = sim.loop
        loop.schedule(loop.now_s + dt, PRIORITY_COMPLETE, self._step_end, step)

    def _step_end(self, step: object) -> None:
        if step.decode:  # type: ignore[attr-defined]
            self.end_decode_step()
        pre = self.prefilling
        for c in step.prefill_chunks:  # type: ignore[attr-defined]
            e = pre[0]
            e[1] -= c
            e[2] += c
            if e[1] > 0:
                break  # only the last chunk of a step can be partial
            pre.popleft()
            _prefilled(self, e[0])
        self._step_start(None)


def set_group_costs(obj: _PrefillSim | _DecodeSim | _ColocatedSim, group: Group, model: ModelSpec,
                    cluster: Cluster, topology: Topology, compression: Compression | str) -> None:
    """KV compression's GPU time (quantise on a prefill group, dequantise on a decode group) and what a
    prefill group's pipeline sends cross."""
    stages = [[cluster.by_id[x] for x in st.gpus] for st in group.stages]
    s = codec_seconds_per_token(model, [(g, st.num_layers) for g, st in zip(stages, group.stages, strict=True)],
                                compression)
    if isinstance(obj, _PrefillSim):
        obj.quantise_s_per_token = s
        obj.pp_send_resources = [topology.crossed([g.node_index for g in a], [g.node_index for g in b])
                                 for a, b in zip(stages, stages[1:], strict=False)]
    elif isinstance(obj, _DecodeSim):
        obj.dequantise_s_per_token = s


class _Replay:
    def __init__(self, plan: Plan, cluster: Cluster, model: ModelSpec, req: _Requests, config: SimConfig,
                 slo: SloSpec | None, stop_after_failures: int | None) -> None:
        self.loop = EventLoop()
        self.req = req
        self.config = config
        self.topology = Topology.of(cluster)
        self.net = FlowNetwork(self.loop, self.topology.capacity_bytes_s)
        self.oversized = 0
        self.preemptions = 0
        self.finished = 0
        self.failures = 0
        self.stop_after = stop_after_failures
        self.ttft_target = slo.ttft_s if slo is not None else math.inf
        self.tpot_target = slo.tpot_s if slo is not None else math.inf
        self.warmup_s = config.warmup_s
        self.group_ids = tuple(g.id for g in plan.groups)
        self.by_id: dict[str, _PrefillSim | _DecodeSim | _ColocatedSim] = {}
        for idx, g in enumerate(plan.groups):
            perf = group_perf_of(g, model, cluster)
            timer = GroupTimer(perf)
            kinds: dict[Phase, type[_PrefillSim] | type[_DecodeSim] | type[_ColocatedSim]] = {
                Phase.PREFILL: _PrefillSim, Phase.DECODE: _DecodeSim, Phase.COLOCATED: _ColocatedSim}
            self.by_id[g.id] = obj = kinds[g.phase](self, idx, timer, perf.kv_capacity_tokens)
            set_group_costs(obj, g, model, cluster, self.topology, plan.kv_transfer.compression)
        routing = plan.routing
        assert routing is not None
        self.load_aware = config.dispatch is Dispatch.LEAST_OUTSTANDING
        self.entry_of: dict[int, str] = {}  # load-aware dispatch: request -> entry group it counts against
        # load-aware dispatch: request -> (KV chooser, decode group it counts against)
        self.decode_of: dict[int, tuple[LeastOutstandingChooser, str]] = {}
        decode_counts: dict[str, int] = {}  # shared by every prefill group's KV chooser
        for src_id, shares in sorted(routing.kv.items()):
            src = self.by_id[src_id]
            assert isinstance(src, _PrefillSim)
            src.chooser = WeightedChooser(shares)
            if self.load_aware:
                src.lor = LeastOutstandingChooser(shares, decode_counts)
            sg = plan.group(src_id)
            stages = [([cluster.by_id[x] for x in s.gpus], s.num_layers) for s in sg.stages]
            for dst_id in sorted(src.chooser.shares):
                dst = self.by_id[dst_id]
                assert isinstance(dst, _DecodeSim)
                dg = plan.group(dst_id)
                paths = kv_paths(model, stages, [cluster.by_id[x] for x in dg.gpus], cluster, self.topology,
                                 plan.kv_transfer.compression,
                                 decode_stages=[([cluster.by_id[x] for x in d.gpus], d.num_layers)
                                                for d in dg.stages])
                src.dest[dst_id] = dst
                dst.links[src.idx] = _Link(self, src, dst, paths)
        self.entry_chooser = WeightedChooser(routing.entry)
        self.entry_lor = LeastOutstandingChooser(routing.entry)

    # -- hooks a changing deployment overrides (see sim.dynamic) -------------------------------------------
    def route_kv(self, src: _PrefillSim, r: int) -> _DecodeSim | None:
        """The decode group that takes request r's KV cache from prefill group `src` (None: none can)."""
        if src.lor is not None:
            gid = src.lor.choose()
            src.lor.started(gid)
            self.decode_of[r] = (src.lor, gid)
            return src.dest[gid]
        assert src.chooser is not None
        return src.dest[src.chooser.choose()]

    def _release(self, r: int, *, finished: bool) -> None:
        """Load-aware dispatch: a prefill group is done with a request at its first token, a colocated or
        decode group when it finishes."""
        gid = self.entry_of.get(r)
        if gid is not None and (finished or isinstance(self.by_id[gid], _PrefillSim)):
            del self.entry_of[r]
            self.entry_lor.released(gid)
        if finished and r in self.decode_of:
            chooser, dst = self.decode_of.pop(r)
            chooser.released(dst)

    def requeue(self, r: int) -> None:
        """Send request r back to the entry router (its KV is gone); a fixed plan never needs it."""
        raise RuntimeError(f"request {r} has no decode group in a fixed plan")

    # -- per-request records -------------------------------------------------------------------------
    def first_token(self, r: int, now: float) -> None:
        req = self.req
        req.first[r] = now
        if self.entry_of:
            self._release(r, finished=False)
        if self.stop_after is not None and now - req.arrival[r] > self.ttft_target \
                and req.arrival[r] >= self.warmup_s:
            self._fail()

    def finish(self, r: int, now: float) -> None:
        req = self.req
        req.finish[r] = now
        if self.entry_of or self.decode_of:
            self._release(r, finished=True)
        self.finished += 1
        if self.stop_after is not None and req.arrival[r] >= self.warmup_s and req.output[r] > 1:
            first = req.first[r]
            if first - req.arrival[r] <= self.ttft_target \
                    and (now - first) / (req.output[r] - 1) > self.tpot_target:
                self._fail()

    def _fail(self) -> None:
        self.failures += 1
        if self.stop_after is not None and self.failures > self.stop_after:
            raise _Stop

    # -- driver ----------------------------------------------------------------------------------------
    def run(self) -> bool:
        req = self.req
        n = len(req.arrival)
        if n == 0:
            return True
        arrival = req.arrival
        loop = self.loop
        if self.load_aware:  # decided on arrival, from the load at that moment
            lor = self.entry_lor

            def target(r: int) -> _PrefillSim | _DecodeSim | _ColocatedSim:
                gid = lor.choose()
                lor.started(gid)
                self.entry_of[r] = gid
                g = self.by_id[gid]
                req.entry[r] = g.idx
                return g
        else:  # weighted round-robin does not depend on load: decided up front
            choose = self.entry_chooser.choose
            targets = [self.by_id[choose()] for _ in range(n)]
            for r, g in enumerate(targets):
                req.entry[r] = g.idx

            def target(r: int) -> _PrefillSim | _DecodeSim | _ColocatedSim:
                return targets[r]

        def arrive(r: int) -> None:
            target(r).arrive(r)  # type: ignore[union-attr]
            if r + 1 < n:
                loop.schedule(arrival[r + 1], PRIORITY_ARRIVAL, arrive, r + 1)

        loop.schedule(arrival[0], PRIORITY_ARRIVAL, arrive, 0)
        try:
            loop.run()
        except _Stop:
            return False
        if self.finished != n:
            raise RuntimeError(f"simulation ended with {n - self.finished} of {n} requests unfinished")
        return True


def simulate(plan: Plan, cluster: Cluster, model: ModelSpec, arrival_s: np.ndarray, prompt_tokens: np.ndarray,
             output_tokens: np.ndarray, config: SimConfig = SimConfig(), *, slo: SloSpec | None = None,
             stop_after_failures: int | None = None, validate: bool = True) -> SimResult:
    """Run every request to completion and return per-request records.

    `arrival_s` must be sorted. With `slo` and `stop_after_failures`, the run stops as soon as more than that
    many measured requests are known to miss the SLO (used by rate bisection; `completed` is then False).
    The plan is validated first (PlanError on e.g. a zero-bandwidth KV link).
    """
    if validate:
        validate_plan(plan, cluster, model)
    arrival = np.asarray(arrival_s, dtype=float)
    if arrival.size and np.any(np.diff(arrival) < 0):
        raise ValueError("arrival times must be sorted")
    req = _Requests(arrival, np.asarray(prompt_tokens), np.asarray(output_tokens))
    replay = _Replay(plan, cluster, model, req, config, slo, stop_after_failures)
    t0 = time.perf_counter()
    completed = replay.run()
    wall = time.perf_counter() - t0
    return SimResult(
        group_ids=replay.group_ids,
        arrival_s=arrival,
        first_token_s=np.asarray(req.first, dtype=float),
        finish_s=np.asarray(req.finish, dtype=float),
        prompt_tokens=np.asarray(req.prompt, dtype=np.int64),
        output_tokens=np.asarray(req.output, dtype=np.int64),
        entry_group=np.asarray(req.entry, dtype=np.int64),
        decode_group=np.asarray(req.decode, dtype=np.int64),
        warmup_s=config.warmup_s,
        completed=completed,
        oversized_requests=replay.oversized,
        end_s=replay.loop.now_s,
        events=replay.loop.events_processed,
        wall_s=wall,
        preemptions=replay.preemptions,
    )

