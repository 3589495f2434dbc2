"""`Generator`: continuous batching of many requests over one engine (what a colocated worker and tests use).

Request lifecycle inside a Generator:
    add_request  -> waiting   (prompt validated: non-empty, shorter than the context window)
    step()       -> prefill   (waiting requests are admitted FIFO while the batch has room; their prompts are
                               prefilled together and each samples its first token)
                 -> running   (every later step decodes one token for every running sequence; new requests
                               join between steps, finished ones leave)
                 -> finished  (EOS -> "stop"; a stop string -> "stop", trimmed from the text; max_tokens or a
                               full context -> "length"; `abort` -> "abort"); the KV cache is released.

Sampling is `workers.sampling.sample_token` (greedy at temperature 0; temperature + top-p otherwise, drawn from
a generator seeded by (request seed, token index)), so a request gives the same tokens here as on the
disaggregated workers. Requests without a seed get one from the Generator's seed and their arrival index.
With a batch-invariant engine (`LlamaEngine`), a request's greedy output does not depend on its neighbours.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from thunderserve.runtime.engine.base import DecodeInput, EngineProtocol, KVCache, SamplingParams
from thunderserve.runtime.workers.sampling import TextStream, sample_token


@dataclass
class RequestOutput:
    """What a request has produced so far (final once `finish_reason` is set)."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated ids (an EOS that ended it is included)
    text: str = ""  # detokenised output, stop string trimmed
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Seq:
    out: RequestOutput
    params: SamplingParams
    seed: int
    stream: TextStream | None
    kv: KVCache | None = None


class Generator:
    """Runs requests on `engine` with continuous batching (see the module docstring for the lifecycle)."""

    def __init__(self, engine: EngineProtocol, *, max_batch_size: int = 64, max_prefill_tokens: int = 8192,
                 seed: int = 0, detokenize: bool = True) -> None:
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch_size and max_prefill_tokens must be positive")
        self.engine = engine
        self.max_batch_size = max_batch_size  # sequences decoded together
        self.max_prefill_tokens = max_prefill_tokens  # prompt tokens prefilled in one step (one prompt always fits)
        self.seed = seed
        self.detokenize = detokenize
        self._eos = frozenset(engine.eos_token_ids)
        self._counter = itertools.count()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._all: dict[str, RequestOutput] = {}

    # ----- requests ----------------------------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int] | str, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (token ids or text); it joins the batch at the next `step`."""
        params = params or SamplingParams()
        index = next(self._counter)
        rid = request_id if request_id is not None else f"req-{index}"
        if rid in self._all:
            raise ValueError(f"duplicate request id '{rid}'")
        ids = self.engine.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.engine.max_context_tokens:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {self.engine.max_context_tokens}"
                             "-token context")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        out = RequestOutput(request_id=rid, prompt_ids=ids)
        stream = (TextStream(decode_text=self.engine.decode_text, stop=tuple(params.stop), special_ids=self._eos)
                  if self.detokenize else None)
        seed = params.seed if params.seed is not None else self.seed * 1_000_003 + index
        self._waiting.append(_Seq(out=out, params=params, seed=seed, stream=stream))
        self._all[rid] = out
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now (finish_reason "abort"); unknown or finished ids are ignored."""
        for queue in (self._waiting, self._running):
            for s in list(queue):
                if s.out.request_id == request_id:
                    queue.remove(s)
                    self._finish(s, "abort")

    def get(self, request_id: str) -> RequestOutput:
        return self._all[request_id]

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    # ----- stepping ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One token for every running sequence and the first token of newly admitted ones; returns those."""
        decoding = list(self._running)
        admitted = self._admit()
        touched: list[_Seq] = []
        if decoding:
            inputs = [DecodeInput(token_id=s.out.token_ids[-1], kv=s.kv) for s in decoding]  # type: ignore[arg-type]
            for s, logits in zip(decoding, self.engine.decode(inputs), strict=True):
                self._push(s, logits)
                touched.append(s)
        if admitted:
            results = self.engine.prefill([s.out.prompt_ids for s in admitted])
            for s, r in zip(admitted, results, strict=True):
                s.kv = r.kv
                self._running.append(s)
                self._push(s, r.logits)
                touched.append(s)
        self._running = [s for s in self._running if not s.out.finished]
        return [s.out for s in touched]

    def run(self) -> None:
        """Step until every queued request has finished."""
        while self.has_unfinished():
            self.step()

    def generate(self, prompts: Sequence[Sequence[int] | str], params: SamplingParams | Sequence[SamplingParams]
                 | None = None) -> list[RequestOutput]:
        """Convenience: add all prompts, run to completion, return outputs in prompt order."""
        per = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, per, strict=True)]
        self.run()
        return [self._all[i] for i in ids]

    def _admit(self) -> list[_Seq]:
        admitted: list[_Seq] = []
        tokens = 0
        while self._waiting and len(self._running) + len(admitted) < self.max_batch_size:
            n = len(self._waiting[0].out.prompt_ids)
            if admitted and tokens + n > self.max_prefill_tokens:
                break
            admitted.append(self._waiting.popleft())
            tokens += n
        return admitted

    def _push(self, s: _Seq, logits: torch.Tensor) -> None:
        out = s.out
        token = sample_token(logits, s.params, s.seed, len(out.token_ids))
        out.token_ids.append(token)
        hit = False
        if s.stream is not None:
            delta, hit = s.stream.push(token)
            out.text += delta
        if hit:
            self._finish(s, "stop", flush=False)
        elif token in self._eos:
            self._finish(s, "stop")
        elif (len(out.token_ids) >= s.params.max_tokens
              or len(out.prompt_ids) + len(out.token_ids) >= self.engine.max_context_tokens):
            self._finish(s, "length")

    def _finish(self, s: _Seq, reason: str, flush: bool = True) -> None:
        if flush and s.stream is not None:
            s.out.text += s.stream.flush()
        s.out.finish_reason = reason
        s.kv = None
