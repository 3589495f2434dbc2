"""Token sampling and incremental detokenisation with stop strings (pure, engine-agnostic).

Sampling is reproducible across processes: the random draw for output token `step` of a request uses a
generator seeded from (request seed, step), so a request sampled partly on a prefill worker and partly on a
decode worker gets the same tokens as one sampled on a single colocated worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from thunderserve.runtime.engine.base import SamplingParams

_SEED_MIX = 0x9E3779B97F4A7C15
_MASK63 = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for one sampling step of one request (splitmix-style mixing, deterministic)."""
    x = (seed * _SEED_MIX + (step + 1) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & ((1 << 64) - 1)
    x ^= x >> 29
    return x & _MASK63


def sample_token(logits: torch.Tensor, params: SamplingParams, seed: int, step: int) -> int:
    """Greedy when temperature == 0; otherwise temperature + nucleus (top_p) sampling."""
    logits = logits.detach().reshape(-1).to(torch.float32)
    if params.temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        keep = (cum - sorted_probs) < params.top_p  # smallest prefix reaching top_p (always >= 1 token)
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    return int(torch.multinomial(probs, 1, generator=gen).item())


@dataclass
class TextStream:
    """Turns generated token ids into text deltas, applying stop strings.

    Text that might be the start of a stop string, or an incomplete UTF-8 character, is held back until it
    is resolved, so a client never sees text that is later retracted. Special tokens (EOS) are not text.
    The state (ids, emitted chars) travels with the KV cache to the decode worker.
    """

    decode_text: Callable[[Sequence[int]], str]
    stop: tuple[str, ...] = ()
    special_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)  # text-bearing generated ids so far
    emitted_chars: int = 0  # characters already sent to the client

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; returns (text to emit now, whether a stop string ended the output)."""
        if token_id not in self.special_ids:
            self.token_ids.append(token_id)
        text = self.decode_text(self.token_ids)
        hit = self._first_stop(text)
        if hit is not None:
            return self._take(text[:hit]), True
        end = len(text)
        while end > self.emitted_chars and text[end - 1] == "\ufffd":
            end -= 1
        end -= self._stop_prefix_len(text[:end])
        return self._take(text[:end]), False

    def flush(self) -> str:
        """Everything not yet emitted (the output ended for another reason than a stop string), less a
        trailing incomplete UTF-8 character (max_tokens may cut one in half: the client gets no U+FFFD)."""
        text = self.decode_text(self.token_ids)
        end = len(text)
        while end > self.emitted_chars and text[end - 1] == "\ufffd":
            end -= 1
        return self._take(text[:end])

    def _take(self, text: str) -> str:
        if len(text) <= self.emitted_chars:
            return ""
        delta = text[self.emitted_chars:]
        self.emitted_chars = len(text)
        return delta

    def _first_stop(self, text: str) -> int | None:
        start = max(self.emitted_chars - max((len(s) for s in self.stop), default=0), 0)
        hits = [i for s in self.stop if s and (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` (beyond what was emitted) that starts some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text) - self.emitted_chars), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
