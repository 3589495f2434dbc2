"""Messages between the router and workers, and worker knobs (the router <-> worker contract).

Every message is one frame of `runtime.kv.transport` whose JSON header has a "type". With a deployment
secret (always, when launched by `serve`), the worker challenges each new control and KV connection and
honours no frame before the peer proved the secret (`transport.server_handshake`); a bad frame or a failed
handshake closes that connection, never the worker.

router -> worker
    configure   {role, kv_shares, peers: {group: [host, port]}, down: [group]}   sent on connect
    submit      {request: GenerateRequest.to_dict()}
    cancel      {request_id}
    set_role    {role}                           change phase live (no weight reload)
    set_routing {kv_shares, peers?, down?}       change KV destinations live
    shutdown    {}
worker -> router
    hello       {group, pid, role, weights_token, kv_port, host, max_context_tokens}   first frame
    events      {events: [event, ...]}           request progress, in order per worker
    heartbeat   {state: WorkerState.to_dict()}   every heartbeat_interval_s

Request events (dicts, "kind" first):
    accepted  {request_id, prompt_tokens, max_tokens}
    rejected  {request_id, message, param, code}     the request is invalid (client error, HTTP 400)
    output    {request_id, index, token_ids, text, finish_reason}   index = position of token_ids[0]
    handoff   {request_id, to, state: start|done}    KV cache on its way to / held by decode group `to`
    error     {request_id, message, code?}           the runtime failed the request (HTTP 503); code
                                                     "kv_transfer_failed" / "not_accepting": another
                                                     worker may take it over (the router retries those)

A retry (the router re-submits a request whose worker died) carries `resume_token_ids` (the output tokens the
client already has) and `resume_text_chars` (the characters of output text it already has): the worker
prefills prompt + those tokens and continues at output index len(resume_token_ids), with the same sampling
step numbers and text state as the first attempt, so a greedy or seeded run continues identically.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from thunderserve.costmodel.comm import Compression
from thunderserve.plan.model import Phase
from thunderserve.policy.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_PREFILL_TOKEN_BUDGET
from thunderserve.runtime.engine.base import SamplingParams

DEFAULT_KV_CAPACITY_TOKENS = 65536  # KV tokens a CPU worker reserves for running requests
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5


@dataclass(frozen=True)
class WorkerConfig:
    """Knobs of one worker process (fixed for its lifetime; role and routing are runtime state)."""

    group_id: str
    role: Phase  # initial phase; changed live by set_role
    compression: Compression = Compression.NONE  # KV transfer compression (plan.kv_transfer)
    prefill_token_budget: int = DEFAULT_PREFILL_TOKEN_BUDGET  # max prompt tokens per prefill batch
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # max sequences per decode batch
    kv_capacity_tokens: int = DEFAULT_KV_CAPACITY_TOKENS  # KV tokens held for admitted requests
    heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    kv_timeout_s: float = 30.0  # bound on one KV send + acknowledgement
    kv_frame_max_bytes: int = 1024**3  # largest KV payload accepted from a peer (launchers: what the model needs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["role"] = str(self.role)
        d["compression"] = str(self.compression)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerConfig:
        return cls(**{**d, "role": Phase(d["role"]), "compression": Compression(d["compression"])})


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request as the router hands it to an entry worker (exactly one prompt form set)."""

    request_id: str
    sampling: SamplingParams
    seed: int  # resolved sampling seed (random when the client gave none), so every worker draws alike
    prompt: str | None = None  # raw text, tokenised by the worker
    prompt_ids: tuple[int, ...] | None = None  # token ids given by the client
    messages: tuple[dict[str, str], ...] | None = None  # chat messages (worker applies the chat template)
    max_tokens: int | None = None  # None: up to the end of the context window
    arrival_s: float = 0.0  # client-side arrival time (diagnostics)
    ignore_eos: bool = False  # keep generating past EOS up to max_tokens (benchmarks)
    resume_token_ids: tuple[int, ...] = ()  # retry: output tokens already delivered (continue after them)
    resume_text_chars: int = 0  # retry: characters of output text already delivered

    def to_dict(self) -> dict[str, Any]:
        s = self.sampling
        return {"request_id": self.request_id, "seed": self.seed, "prompt": self.prompt,
                "prompt_ids": list(self.prompt_ids) if self.prompt_ids is not None else None,
                "messages": [dict(m) for m in self.messages] if self.messages is not None else None,
                "max_tokens": self.max_tokens, "arrival_s": self.arrival_s, "ignore_eos": self.ignore_eos,
                "resume_token_ids": list(self.resume_token_ids), "resume_text_chars": self.resume_text_chars,
                "sampling": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                             "seed": s.seed, "stop": list(s.stop)}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerateRequest:
        s = d["sampling"]
        return cls(request_id=str(d["request_id"]), seed=int(d["seed"]), prompt=d.get("prompt"),
                   prompt_ids=tuple(d["prompt_ids"]) if d.get("prompt_ids") is not None else None,
                   messages=tuple(d["messages"]) if d.get("messages") is not None else None,
                   max_tokens=d.get("max_tokens"), arrival_s=float(d.get("arrival_s", 0.0)),
                   ignore_eos=bool(d.get("ignore_eos", False)),
                   resume_token_ids=tuple(int(t) for t in d.get("resume_token_ids") or ()),
                   resume_text_chars=int(d.get("resume_text_chars", 0)),
                   sampling=SamplingParams(max_tokens=int(s["max_tokens"]), temperature=float(s["temperature"]),
                                           top_p=float(s["top_p"]), seed=s.get("seed"),
                                           stop=tuple(s.get("stop", ()))))


@dataclass(frozen=True)
class WorkerState:
    """A worker's self-report (heartbeat): what the router and /metrics show."""

    group_id: str
    role: str
    pid: int
    weights_token: int
    queued_prefill: int = 0  # prompts waiting for prefill
    waiting_decode: int = 0  # sequences with KV waiting to join the decode batch
    running_decode: int = 0  # sequences in the decode batch
    kv_used_tokens: int = 0  # KV tokens reserved
    kv_capacity_tokens: int = 0
    handoffs_in_flight: int = 0  # KV caches being sent
    kv_bytes_sent: dict[str, int] = field(default_factory=dict)  # decode group -> bytes shipped
    kv_bytes_received: int = 0
    prefill_tokens_total: int = 0
    generated_tokens_total: int = 0
    requests_finished_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerState:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})
