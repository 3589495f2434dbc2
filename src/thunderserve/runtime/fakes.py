"""In-repo fakes for the runtime seams, so worker/router state machines are tested without a model.

`FakeEngine` implements `EngineProtocol` with a deterministic toy "model": byte-level tokens, and the next
token is a function of the whole context stored in the KV cache (so a KV cache that is lost, truncated or
corrupted in transfer changes the output). `RawKvCodec` serialises a `KVCache` losslessly (float32).
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Sequence

import numpy as np
import torch

from thunderserve.runtime.engine.base import DecodeInput, KVCache, PrefillResult

FAKE_VOCAB = 258  # bytes 0..255, then BOS (256) and EOS (257)
FAKE_BOS = 256
FAKE_EOS = 257


def fake_next_token(context: Sequence[int], eos_every: int = 0) -> int:
    """The toy model: a lowercase letter chosen by the last three tokens and the context length.

    With `eos_every` > 0, EOS comes whenever the context length is a multiple of it.
    """
    n = len(context)
    if eos_every > 0 and n % eos_every == 0:
        return FAKE_EOS
    return ord("a") + (sum(context[-3:]) * 7 + n) % 26


class FakeEngine:
    """Deterministic EngineProtocol implementation (CPU, tiny tensors, optional per-call delay)."""

    def __init__(self, *, max_context_tokens: int = 512, num_layers: int = 2, step_delay_s: float = 0.0,
                 eos_every: int = 0, logit_spread: float = 1.0, poison_token: int = -1) -> None:
        self._max_context_tokens = max_context_tokens
        self.num_layers = num_layers
        self.step_delay_s = step_delay_s
        self.eos_every = eos_every
        self.logit_spread = logit_spread
        self.poison_token = poison_token  # a prompt containing it makes prefill raise (failure isolation tests)
        self._weights_token = int.from_bytes(os.urandom(7), "big")
        self.prefill_calls: list[int] = []  # batch size of each prefill call
        self.decode_calls: list[int] = []  # batch size of each decode call
        self._lock = threading.Lock()

    @property
    def weights_token(self) -> int:
        return self._weights_token

    @property
    def max_context_tokens(self) -> int:
        return self._max_context_tokens

    @property
    def vocab_size(self) -> int:
        return FAKE_VOCAB

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return (FAKE_EOS,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"
        return [FAKE_BOS, *self.encode(text)]

    def _logits(self, context: Sequence[int]) -> torch.Tensor:
        best = fake_next_token(context, self.eos_every)
        logits = -self.logit_spread * (torch.arange(FAKE_VOCAB, dtype=torch.float32) - best).abs()
        logits[best] += 1.0
        return logits

    def _kv_of(self, token_ids: Sequence[int]) -> KVCache:
        ids = torch.tensor(list(token_ids), dtype=torch.float32)
        keys = ids.view(1, 1, -1, 1).expand(self.num_layers, 1, len(token_ids), 4).clone()
        return KVCache(keys=keys, values=keys * 2.0)

    @staticmethod
    def _context(kv: KVCache) -> list[int]:
        return [int(round(v)) for v in kv.keys[0, 0, :, 0].tolist()]

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        with self._lock:
            self.prefill_calls.append(len(prompts))
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        out = []
        for prompt in prompts:
            if not prompt:
                raise ValueError("empty prompt")
            if self.poison_token in prompt:
                raise ValueError(f"poison token {self.poison_token} in the prompt")
            out.append(PrefillResult(logits=self._logits(prompt), kv=self._kv_of(prompt)))
        return out

    def decode(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]:
        with self._lock:
            self.decode_calls.append(len(inputs))
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        out = []
        for inp in inputs:
            new = self._kv_of([inp.token_id])
            inp.kv.keys = torch.cat([inp.kv.keys, new.keys], dim=2)
            inp.kv.values = torch.cat([inp.kv.values, new.values], dim=2)
            out.append(self._logits(self._context(inp.kv)))
        return out

    def greedy(self, prompt: Sequence[int], max_tokens: int) -> list[int]:
        """Reference greedy continuation (what a correct runtime must produce at temperature 0)."""
        context = list(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            tok = fake_next_token(context, self.eos_every)
            out.append(tok)
            context.append(tok)
            if tok == FAKE_EOS or len(context) >= self._max_context_tokens:
                break
        return out


_RAW_HEAD = struct.Struct(">I")


class RawKvCodec:
    """Lossless KV serialisation (float32 arrays plus a JSON shape header); the no-dependency codec."""

    def encode(self, kv: KVCache) -> bytes:
        keys = kv.keys.detach().to(torch.float32).contiguous().numpy()
        values = kv.values.detach().to(torch.float32).contiguous().numpy()
        head = json.dumps({"shape": list(keys.shape), "first_layer": kv.first_layer,
                           "dtype": str(kv.keys.dtype).removeprefix("torch.")}).encode()
        return _RAW_HEAD.pack(len(head)) + head + keys.tobytes() + values.tobytes()

    def decode(self, data: bytes) -> KVCache:
        (n,) = _RAW_HEAD.unpack_from(data)
        head = json.loads(data[_RAW_HEAD.size:_RAW_HEAD.size + n])
        shape = tuple(head["shape"])
        count = int(np.prod(shape))
        arr = np.frombuffer(data, dtype=np.float32, offset=_RAW_HEAD.size + n, count=2 * count)
        dtype = getattr(torch, head["dtype"])
        keys = torch.from_numpy(arr[:count].copy()).view(shape).to(dtype)
        values = torch.from_numpy(arr[count:].copy()).view(shape).to(dtype)
        return KVCache(keys=keys, values=values, first_layer=int(head["first_layer"]))
