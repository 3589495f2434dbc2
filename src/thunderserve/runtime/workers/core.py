"""The worker state machine: queues, role, KV routing and batching around an engine (no sockets, no threads).

Request lifecycle (what happens to one request, end to end):
    arrive    the router picks an entry group with `WeightedChooser(routing.entry)` and sends `submit`
    queue     the entry worker tokenises and validates it (`accepted` or `rejected`), then queues the prompt
    prefill   `select_prefill_batch` (the simulator's own decision code) picks a FIFO prefix of the queue that
              fits the token budget and free KV memory; the engine prefills the batch; the first token is
              sampled and streamed (`output` index 0)
    transfer  a prefill-role worker picks a decode group with `WeightedChooser(routing.kv[group])`, encodes
              the KV cache with the plan's compression and ships it (`handoff` start -> done); its prompt's
              KV memory stays reserved until the decode side acknowledges. A colocated worker (or a
              prefill worker with no live decode destination) keeps the cache and decodes it itself.
    decode    the decode worker queues the imported cache; `admit_decodes` admits a FIFO prefix whose
              prompt + max_tokens KV reservation fits (backpressure: the rest wait, never dropped); every
              step decodes the whole running batch (continuous batching: sequences join and leave between
              steps) and streams one token per sequence
    finish    EOS, a stop string or max_tokens/context end -> the last `output` carries finish_reason and
              the reservation is released; an engine or transfer failure -> `error` for the requests hit.
    retry     a request whose worker died comes back (a new attempt id) with the output already delivered
              (`resume_token_ids`, `resume_text_chars`): it is prefilled as prompt + those tokens and continues
              at the next output index with the same sampling steps and text state (exactly once, in order).

Role (prefill / decode / colocated) and KV routing shares are runtime state: `set_role` and `set_kv_routing`
change them between steps without touching the engine (weights stay loaded; `weights_token` is unchanged).
The role only decides what happens to *new* work: a worker always finishes (drains) what it holds.

All methods must be called from one thread (the worker runs them on a single-thread executor); events are
appended to an outbox in production order and drained by the process layer (`drain_events`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from thunderserve.plan.model import Phase
from thunderserve.policy.batching import admit_decodes, select_prefill_batch
from thunderserve.policy.routing import WeightedChooser
from thunderserve.runtime.engine.base import (
    DecodeInput,
    EngineProtocol,
    KVCache,
    PrefillResult,
    SamplingParams,
)
from thunderserve.runtime.workers.codec import KvCodec
from thunderserve.runtime.workers.protocol import GenerateRequest, WorkerConfig, WorkerState
from thunderserve.runtime.workers.sampling import TextStream, sample_token


@dataclass
class _Pending:
    """A validated prompt waiting for prefill."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int
    ignore_eos: bool = False
    resumed: tuple[int, ...] = ()  # a retry: output tokens already delivered (the tail of prompt_ids)
    resume_chars: int = 0  # a retry: output characters already delivered


@dataclass
class _Seq:
    """A sequence past prefill: its KV cache and generation state."""

    request_id: str
    kv: KVCache
    prompt_tokens: int
    max_tokens: int
    sampling: SamplingParams
    seed: int
    text: TextStream
    last_token: int = -1
    num_generated: int = 0
    ignore_eos: bool = False

    @property
    def reserve_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    def meta(self, src: str) -> dict[str, Any]:
        """What travels with the KV cache (all the state the decode side needs to continue)."""
        s = self.sampling
        return {"src": src, "prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens,
                "seed": self.seed, "last_token": self.last_token, "num_generated": self.num_generated,
                "text_ids": list(self.text.token_ids), "emitted_chars": self.text.emitted_chars,
                "ignore_eos": self.ignore_eos,
                "sampling": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                             "seed": s.seed, "stop": list(s.stop)}}


@dataclass(frozen=True)
class KvHandoff:
    """A KV cache to ship: the process layer sends it, then calls `handoff_finished`."""

    request_id: str
    dest_group: str
    meta: dict[str, Any]
    payload: bytes


@dataclass
class StepResult:
    handoffs: list[KvHandoff] = field(default_factory=list)
    prefilled: int = 0  # prompts prefilled this step
    decoded: int = 0  # sequences decoded this step


class WorkerCore:
    """One worker's queues and decisions; drives an `EngineProtocol` (real or fake)."""

    def __init__(self, engine: EngineProtocol, config: WorkerConfig, codec: KvCodec,
                 kv_shares: Mapping[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.config = config
        self.codec = codec
        self.clock = clock
        self.role = config.role
        self._kv_chooser = WeightedChooser(kv_shares or {})
        self._down: set[str] = set()
        self._prefill_queue: deque[_Pending] = deque()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._in_flight: dict[str, int] = {}  # request id -> prompt tokens reserved while its KV is shipped
        self._kv_used = 0  # KV tokens reserved (running reservations + in-flight prompts), kept as a counter
        self._events: list[dict[str, Any]] = []
        self._events_lock = threading.Lock()
        self._eos = frozenset(engine.eos_token_ids)
        self.prefill_tokens_total = 0
        self.generated_tokens_total = 0
        self.requests_finished_total = 0

    # ---- control (runtime state, no reload) -------------------------------------------------------
    def set_role(self, role: Phase | str) -> None:
        self.role = Phase(role)

    def set_kv_routing(self, shares: Mapping[str, float] | None = None, down: Iterable[str] | None = None
                       ) -> None:
        """Replace the KV destination shares and/or the set of decode groups known to be down."""
        if shares is not None:
            self._kv_chooser.update(shares)
        if down is not None:
            self._down = set(down)

    @property
    def kv_shares(self) -> dict[str, float]:
        return self._kv_chooser.shares

    # ---- inputs -----------------------------------------------------------------------------------
    def submit(self, req: GenerateRequest) -> None:
        """Validate and tokenise a new request; queue it for prefill (emits accepted/rejected/error)."""
        rid = req.request_id
        if self.role is Phase.DECODE:
            self._emit({"kind": "error", "request_id": rid, "code": "not_accepting",
                        "message": f"worker {self.config.group_id} is in decode role and takes no new requests"})
            return
        try:
            if req.messages is not None:
                if not req.messages:
                    self._reject(rid, "messages must not be empty", "messages")
                    return
                ids = list(self.engine.apply_chat_template([dict(m) for m in req.messages]))
                param = "messages"
            elif req.prompt_ids is not None:
                ids = [int(t) for t in req.prompt_ids]
                param = "prompt"
                vocab = getattr(self.engine, "vocab_size", None)
                bad = [t for t in ids if t < 0 or (vocab is not None and t >= vocab)]
                if bad:
                    self._reject(rid, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
                    return
            else:
                ids = list(self.engine.encode(req.prompt or ""))
                param = "prompt"
        except Exception as exc:  # noqa: BLE001 - a template/tokeniser refusal is the client's input
            self._reject(rid, f"cannot tokenise the input: {exc}", "messages" if req.messages else "prompt")
            return
        if not ids:
            self._reject(rid, f"{param} is empty after tokenisation", param)
            return
        ctx = self.engine.max_context_tokens
        max_tokens = req.max_tokens if req.max_tokens is not None else ctx - len(ids)
        if max_tokens < 1 or len(ids) + max_tokens > ctx:
            self._reject(rid, f"This model's maximum context length is {ctx} tokens. However, you requested "
                              f"{len(ids) + max(max_tokens, 0)} tokens ({len(ids)} in the {param}, "
                              f"{max(max_tokens, 0)} in the completion). Please reduce the length.",
                         "max_tokens" if req.max_tokens is not None and len(ids) < ctx else param,
                         "context_length_exceeded")
            return
        if len(ids) + max_tokens > self.config.kv_capacity_tokens:
            self._reject(rid, f"request needs {len(ids) + max_tokens} KV tokens; this deployment holds at most "
                              f"{self.config.kv_capacity_tokens} per worker", "max_tokens", "kv_capacity_exceeded")
            return
        resumed = tuple(int(t) for t in req.resume_token_ids)
        if len(resumed) >= max_tokens:
            self._reject(rid, f"resume_token_ids: {len(resumed)} tokens already delivered of max_tokens="
                              f"{max_tokens}; nothing left to generate", "max_tokens")
            return
        self._emit({"kind": "accepted", "request_id": rid, "prompt_tokens": len(ids), "max_tokens": max_tokens})
        self._prefill_queue.append(_Pending(rid, ids + list(resumed), max_tokens, req.sampling, req.seed,
                                            req.ignore_eos, resumed, req.resume_text_chars))

    def import_kv(self, request_id: str, meta: Mapping[str, Any], payload: bytes) -> None:
        """Take over a prefilled request from another worker; raises (-> negative ack) if it cannot."""
        reserve = int(meta["prompt_tokens"]) + int(meta["max_tokens"])
        if reserve > self.config.kv_capacity_tokens:
            raise ValueError(f"request needs {reserve} KV tokens, worker {self.config.group_id} holds "
                             f"{self.config.kv_capacity_tokens}")
        kv = self.codec.decode(payload)
        s = meta["sampling"]
        sampling = SamplingParams(max_tokens=int(s["max_tokens"]), temperature=float(s["temperature"]),
                                  top_p=float(s["top_p"]), seed=s.get("seed"), stop=tuple(s.get("stop", ())))
        text = TextStream(self.engine.decode_text, sampling.stop, self._eos,
                          [int(t) for t in meta["text_ids"]], int(meta["emitted_chars"]))
        self._waiting.append(_Seq(request_id, kv, int(meta["prompt_tokens"]), int(meta["max_tokens"]), sampling,
                                  int(meta["seed"]), text, int(meta["last_token"]), int(meta["num_generated"]),
                                  bool(meta.get("ignore_eos", False))))

    def reclaim(self, request_ids: Iterable[str]) -> None:
        """Hand back requests still queued for prefill (not started: no compute spent, nothing emitted but
        `accepted`) so the router can route them again; emits `reclaimed` for each. Started ones stay."""
        wanted = set(request_ids)
        for p in [p for p in self._prefill_queue if p.request_id in wanted]:
            self._prefill_queue.remove(p)
            self._emit({"kind": "reclaimed", "request_id": p.request_id})

    def cancel(self, request_id: str) -> bool:
        """Drop a request wherever it is (client gone or failed elsewhere); True if it was held here."""
        found = self._release_in_flight(request_id)
        for p in [p for p in self._prefill_queue if p.request_id == request_id]:
            self._prefill_queue.remove(p)
            found = True
        for w in [w for w in self._waiting if w.request_id == request_id]:
            self._waiting.remove(w)
            found = True
        for seq in list(self._running):
            if seq.request_id == request_id:
                self._running.remove(seq)
                self._kv_used -= seq.reserve_tokens
                found = True
        return found

    def handoff_finished(self, request_id: str, dest_group: str, ok: bool, error: str = "") -> None:
        """A KV send ended: release the prompt's reservation and report the outcome."""
        if not self._release_in_flight(request_id):
            return  # cancelled meanwhile
        if ok:
            self._emit({"kind": "handoff", "request_id": request_id, "to": dest_group, "state": "done"})
        else:
            self._emit({"kind": "error", "request_id": request_id, "code": "kv_transfer_failed",
                        "message": f"KV transfer from {self.config.group_id} to {dest_group} failed: {error}"})

    # ---- compute ----------------------------------------------------------------------------------
    def has_work(self) -> bool:
        """Whether `step` would make progress (never true while everything waits on KV memory)."""
        can_prefill = bool(self._prefill_queue) and select_prefill_batch(
            [len(self._prefill_queue[0].prompt_ids)], self.config.prefill_token_budget, self.kv_free_tokens(),
            self.config.max_batch_size) > 0
        return bool(can_prefill or self._running or self._can_admit())

    def fail_all(self, message: str) -> None:
        """Fail every request this worker holds (the step loop hit an unexpected error)."""
        ids = [p.request_id for p in self._prefill_queue] + [s.request_id for s in self._waiting] + \
              [s.request_id for s in self._running] + list(self._in_flight)
        for rid in ids:
            self.cancel(rid)
            self._fail(rid, message)

    def kv_used_tokens(self) -> int:
        return self._kv_used

    def _release_in_flight(self, request_id: str) -> bool:
        tokens = self._in_flight.pop(request_id, None)
        if tokens is None:
            return False
        self._kv_used -= tokens
        return True

    def kv_free_tokens(self) -> int:
        return self.config.kv_capacity_tokens - self.kv_used_tokens()

    def _can_admit(self) -> bool:
        if not self._waiting:
            return False
        return admit_decodes([self._waiting[0].reserve_tokens], self.kv_free_tokens(), len(self._running),
                             self.config.max_batch_size) > 0

    def step(self) -> StepResult:
        """One scheduling iteration: a prefill batch (if any prompt fits), then one decode step."""
        result = StepResult()
        self._prefill_step(result)
        self._decode_step(result)
        return result

    def _prefill_step(self, result: StepResult) -> None:
        lens = [len(p.prompt_ids) for p in self._prefill_queue]
        n = select_prefill_batch(lens, self.config.prefill_token_budget, self.kv_free_tokens(),
                                 self.config.max_batch_size)
        if n == 0:
            return
        batch = [self._prefill_queue.popleft() for _ in range(n)]
        done = self._prefill_isolated(batch)
        result.prefilled = len(done)
        for p, out in done:
            self.prefill_tokens_total += len(p.prompt_ids)
            k = len(p.resumed)  # a retry continues after the delivered tokens: same steps, same text state
            text = TextStream(self.engine.decode_text, p.sampling.stop, self._eos,
                              [t for t in p.resumed if t not in self._eos], p.resume_chars)
            seq = _Seq(p.request_id, out.kv, len(p.prompt_ids) - k, p.max_tokens, p.sampling, p.seed, text,
                       last_token=p.resumed[-1] if k else -1, num_generated=k, ignore_eos=p.ignore_eos)
            if self._advance(seq, out.logits):
                continue
            dest = self._choose_dest() if self.role is Phase.PREFILL else None
            if dest is None:
                self._waiting.append(seq)
                continue
            try:
                payload = self.codec.encode(seq.kv)
            except Exception as exc:  # noqa: BLE001
                self._fail(seq.request_id, f"KV encoding failed on worker {self.config.group_id}: {exc}")
                continue
            self._in_flight[seq.request_id] = seq.prompt_tokens
            self._kv_used += seq.prompt_tokens
            self._emit({"kind": "handoff", "request_id": seq.request_id, "to": dest, "state": "start"})
            result.handoffs.append(KvHandoff(seq.request_id, dest, seq.meta(self.config.group_id), payload))

    def _prefill_isolated(self, batch: list[_Pending]) -> list[tuple[_Pending, PrefillResult]]:
        """Prefill a batch; if it fails, retry one by one so one bad request fails alone (the worker goes on)."""
        try:
            return list(zip(batch, self.engine.prefill([p.prompt_ids for p in batch]), strict=True))
        except Exception as exc:  # noqa: BLE001
            if self.engine_broken():
                raise  # the worker goes down and its requests are retried elsewhere (see engine_broken)
            if len(batch) == 1:
                self._fail(batch[0].request_id, f"prefill failed on worker {self.config.group_id}: {exc}")
                return []
        return [pair for p in batch for pair in self._prefill_isolated([p])]

    def engine_broken(self) -> str | None:
        """Why the engine can no longer compute at all (a tensor-parallel group that lost a rank), else None.
        Its errors are then not the requests' fault: the core raises instead of failing them, and the worker
        server stops, so the router retries them on a healthy worker."""
        reason = getattr(self.engine, "broken", None)
        return str(reason) if reason else None

    def _choose_dest(self) -> str | None:
        try:
            return self._kv_chooser.choose(exclude=self._down)
        except LookupError:
            return None

    def _decode_step(self, result: StepResult) -> None:
        n = admit_decodes([s.reserve_tokens for s in self._waiting], self.kv_free_tokens(), len(self._running),
                          self.config.max_batch_size)
        for _ in range(n):
            seq = self._waiting.popleft()
            self._kv_used += seq.reserve_tokens
            self._running.append(seq)
        if not self._running:
            return
        batch = list(self._running)
        try:
            logits = self.engine.decode([DecodeInput(token_id=s.last_token, kv=s.kv) for s in batch])
        except Exception as exc:  # noqa: BLE001
            if self.engine_broken():
                raise  # the worker goes down and its requests are retried elsewhere (see engine_broken)
            for s in batch:
                self._running.remove(s)
                self._kv_used -= s.reserve_tokens
                self._fail(s.request_id, f"decode failed on worker {self.config.group_id}: {exc}")
            return
        result.decoded = len(batch)
        for s, lg in zip(batch, logits, strict=True):
            if self._advance(s, lg):
                self._running.remove(s)
                self._kv_used -= s.reserve_tokens

    def _advance(self, seq: _Seq, logits: Any) -> bool:
        """Sample the next token, stream it, and say whether the sequence is finished."""
        tok = sample_token(logits, seq.sampling, seq.seed, seq.num_generated)
        index = seq.num_generated
        seq.num_generated += 1
        seq.last_token = tok
        self.generated_tokens_total += 1
        delta, stopped = seq.text.push(tok)
        reason: str | None = None
        if stopped or (tok in self._eos and not seq.ignore_eos):
            reason = "stop"
        elif seq.num_generated >= seq.max_tokens or \
                seq.prompt_tokens + seq.num_generated >= self.engine.max_context_tokens:
            reason = "length"
        if reason is not None and not stopped:
            delta += seq.text.flush()
        self._emit({"kind": "output", "request_id": seq.request_id, "index": index, "token_ids": [tok],
                    "text": delta, "finish_reason": reason})
        if reason is not None:
            self.requests_finished_total += 1
        return reason is not None

    # ---- events -----------------------------------------------------------------------------------
    def _emit(self, event: dict[str, Any]) -> None:
        with self._events_lock:
            self._events.append(event)

    def _reject(self, request_id: str, message: str, param: str | None, code: str | None = None) -> None:
        self._emit({"kind": "rejected", "request_id": request_id, "message": message, "param": param,
                    "code": code})

    def _fail(self, request_id: str, message: str) -> None:
        self._emit({"kind": "error", "request_id": request_id, "message": message})

    def drain_events(self) -> list[dict[str, Any]]:
        with self._events_lock:
            out, self._events = self._events, []
        return out

    def state(self, pid: int) -> WorkerState:
        """A snapshot for heartbeats (plain counts; safe to read while a step runs)."""
        return WorkerState(
            group_id=self.config.group_id, role=str(self.role), pid=pid,
            weights_token=int(self.engine.weights_token), queued_prefill=len(self._prefill_queue),
            waiting_decode=len(self._waiting), running_decode=len(self._running),
            kv_used_tokens=self.kv_used_tokens(), kv_capacity_tokens=self.config.kv_capacity_tokens,
            handoffs_in_flight=len(self._in_flight), prefill_tokens_total=self.prefill_tokens_total,
            generated_tokens_total=self.generated_tokens_total,
            requests_finished_total=self.requests_finished_total)
