"""Measure an engine (anything implementing `runtime.engine.base.EngineProtocol`): whole-model latencies.

* prefill: a batch of `b` prompts of `L` tokens each, for every (b, L) of the grid;
* decode: one step for `b` sequences holding `c` tokens of context each, for every (b, c);
* KV codec (when given): encode + decode of one request's KV cache of `c` tokens (quantise / transfer cost).

Every shape is run `warmup` times untimed, then `repeats` times timed; the median is the measurement.
Decode contexts come from one untimed prefill of the longest context, sliced and cloned per sequence (the KV
layout is the engine contract's [layers, kv_heads, tokens, head_dim]), so setting up a batch of 64 sequences
costs one prefill, not 64. Token ids are drawn from a seeded generator, so runs are repeatable.
The clock and the device synchronisation are injectable: tests drive this with a fake engine and a fake clock.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

from thunderserve.costmodel.fit import PassKind
from thunderserve.profiling.schema import KvMeasurement, Measurement
from thunderserve.runtime.engine.base import DecodeInput, EngineProtocol, KVCache

Clock = Callable[[], float]


class KvCodec(Protocol):
    """Serialises a KV cache for transfer (optionally quantised) and restores it."""

    def encode(self, kv: KVCache) -> bytes: ...

    def decode(self, data: bytes) -> KVCache: ...


@dataclass(frozen=True)
class ProfileGrid:
    """Which shapes to measure and how often."""

    prefill_batch_sizes: tuple[int, ...] = (1, 2, 4)
    prompt_tokens: tuple[int, ...] = (16, 64, 256)
    decode_batch_sizes: tuple[int, ...] = (1, 4, 16, 32)
    context_tokens: tuple[int, ...] = (64, 256)
    kv_tokens: tuple[int, ...] = (256,)
    warmup: int = 1
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("prefill_batch_sizes", "prompt_tokens", "decode_batch_sizes", "context_tokens", "kv_tokens"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive")
        if self.repeats <= 0 or self.warmup < 0:
            raise ValueError("repeats must be positive and warmup non-negative")

    @property
    def num_steps(self) -> int:
        """Shapes to measure (for a progress bar): prefill + decode + KV."""
        return (len(self.prefill_batch_sizes) * len(self.prompt_tokens)
                + len(self.decode_batch_sizes) * len(self.context_tokens) + len(self.kv_tokens))


@dataclass
class Timer:
    """Times a call `repeats` times after `warmup` untimed calls; returns every timed duration."""

    clock: Clock = time.perf_counter
    sync: Callable[[], None] = field(default=lambda: None)

    def run(self, fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        out = []
        for _ in range(repeats):
            t0 = self.clock()
            fn()
            self.sync()
            out.append(self.clock() - t0)
        return out


def _prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    low = min(100, max(vocab_size // 2, 1))  # stay clear of special tokens at the bottom of the vocabulary
    return [rng.randrange(low, vocab_size) for _ in range(length)]


def _clone_prefix(kv: KVCache, tokens: int) -> KVCache:
    return KVCache(keys=kv.keys[:, :, :tokens].clone(), values=kv.values[:, :, :tokens].clone(),
                   first_layer=kv.first_layer)


def _measurement(kind: PassKind, batch: int, tokens: int, times: Sequence[float]) -> Measurement:
    positive = [max(t, 1e-9) for t in times]
    return Measurement(phase=kind, batch_size=batch, tokens=tokens, latency_s=statistics.median(positive),
                       samples_s=tuple(round(t, 9) for t in positive))


def profile_engine(engine: EngineProtocol, grid: ProfileGrid, vocab_size: int, *, timer: Timer | None = None,
                   on_step: Callable[[str], None] | None = None) -> list[Measurement]:
    """Prefill and decode latencies over the grid (medians); `on_step(label)` after each shape."""
    timer = timer or Timer()
    rng = random.Random(grid.seed)
    done = on_step or (lambda _label: None)
    out: list[Measurement] = []
    for b in grid.prefill_batch_sizes:
        for length in grid.prompt_tokens:
            prompts = [_prompt(rng, length, vocab_size) for _ in range(b)]
            times = timer.run(partial(engine.prefill, prompts), grid.warmup, grid.repeats)
            out.append(_measurement(PassKind.PREFILL, b, length, times))
            done(f"prefill b={b} L={length}")
    if grid.decode_batch_sizes and grid.context_tokens:
        longest = max(grid.context_tokens)
        base = engine.prefill([_prompt(rng, longest, vocab_size)])[0].kv
        token = _prompt(rng, 1, vocab_size)[0]
        for b in grid.decode_batch_sizes:
            for ctx in grid.context_tokens:
                inputs = [DecodeInput(token_id=token, kv=_clone_prefix(base, ctx)) for _ in range(b)]
                times = timer.run(partial(engine.decode, inputs), grid.warmup, grid.repeats)
                out.append(_measurement(PassKind.DECODE, b, ctx, times))
                done(f"decode b={b} ctx={ctx}")
    return out


def profile_kv(engine: EngineProtocol, codecs: dict[str, KvCodec], grid: ProfileGrid, vocab_size: int, *,
               timer: Timer | None = None, on_step: Callable[[str], None] | None = None) -> list[KvMeasurement]:
    """Encode/decode cost of one request's KV cache per codec and size (median seconds, bytes before/after)."""
    timer = timer or Timer()
    rng = random.Random(grid.seed + 1)
    out: list[KvMeasurement] = []
    for tokens in grid.kv_tokens:
        kv = engine.prefill([_prompt(rng, tokens, vocab_size)])[0].kv
        raw = int(kv.keys.numel() * kv.keys.element_size() + kv.values.numel() * kv.values.element_size())
        for name, codec in sorted(codecs.items()):
            blob = codec.encode(kv)
            enc = timer.run(partial(codec.encode, kv), grid.warmup, grid.repeats)
            dec = timer.run(partial(codec.decode, blob), grid.warmup, grid.repeats)
            out.append(KvMeasurement(method=name, tokens=tokens, raw_bytes=raw, encoded_bytes=max(len(blob), 1),
                                     encode_s=max(statistics.median(enc), 1e-9),
                                     decode_s=max(statistics.median(dec), 1e-9)))
        if on_step is not None:
            on_step(f"kv tokens={tokens}")
    return out
