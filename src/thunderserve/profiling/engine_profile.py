"""Measure an engine (anything implementing `runtime.engine.base.EngineProtocol`): whole-model latencies.

* prefill: a batch of `b` prompts of `L` tokens each, for every (b, L) of the grid;
* decode: one step for `b` sequences holding `c` tokens of context each, for every (b, c);
* KV codec (when given): encode + decode of one request's KV cache of `c` tokens (quantise / transfer cost).

Every shape is run `warmup` times untimed, then `repeats` times timed; the median is the measurement.
`profile_engine_shared` measures every shape twice, alone and with busy neighbours (the deployment's other
workers on the same machine, see `profiling.neighbours`), back to back so both see the same background load.
Decode contexts come from one untimed prefill of the longest context, sliced and cloned per sequence (the KV
layout is the engine contract's [layers, kv_heads, tokens, head_dim]), so setting up a batch of 64 sequences
costs one prefill, not 64. Token ids are drawn from a seeded generator, so runs are repeatable.
The clock and the device synchronisation are injectable: tests drive this with a fake engine and a fake clock.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
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
    """Times a call `repeats` times after `warmup` untimed calls; returns every timed duration.

    With `cpu_clock` (e.g. `time.process_time`), `last_cpu_s` holds the CPU seconds of each timed call of the
    last `run`: on a shared machine, CPU / wall time says what share of the cores the measurement got.
    """

    clock: Clock = time.perf_counter
    sync: Callable[[], None] = field(default=lambda: None)
    cpu_clock: Clock | None = None
    last_cpu_s: list[float] = field(default_factory=list)

    def run(self, fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            fn()
        self.sync()
        out, cpu = [], []
        for _ in range(repeats):
            c0 = self.cpu_clock() if self.cpu_clock is not None else 0.0
            t0 = self.clock()
            fn()
            self.sync()
            out.append(self.clock() - t0)
            if self.cpu_clock is not None:
                cpu.append(self.cpu_clock() - c0)
        self.last_cpu_s = cpu
        return out


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    """`length` token ids drawn from `rng`, clear of the special tokens at the bottom of the vocabulary."""
    low = min(100, max(vocab_size // 2, 1))
    return [rng.randrange(low, vocab_size) for _ in range(length)]


def _clone_prefix(kv: KVCache, tokens: int) -> KVCache:
    return KVCache(keys=kv.keys[:, :, :tokens].clone(), values=kv.values[:, :, :tokens].clone(),
                   first_layer=kv.first_layer)


def _measurement(kind: PassKind, batch: int, tokens: int, times: Sequence[float],
                 cpu_s: Sequence[float] = ()) -> Measurement:
    positive = [max(t, 1e-9) for t in times]
    return Measurement(phase=kind, batch_size=batch, tokens=tokens, latency_s=statistics.median(positive),
                       samples_s=tuple(round(t, 9) for t in positive),
                       cpu_s=round(max(statistics.median(cpu_s), 0.0), 9) if cpu_s else None)


@dataclass(frozen=True)
class _Shape:
    kind: PassKind
    batch: int
    tokens: int
    make: Callable[[], Callable[[], object]]  # a fresh call (decode: fresh caches, so every run sees `tokens`)

    @property
    def label(self) -> str:
        return f"{self.kind.value} b={self.batch} {'L' if self.kind is PassKind.PREFILL else 'ctx'}={self.tokens}"


def _shapes(engine: EngineProtocol, grid: ProfileGrid, vocab_size: int) -> Iterator[_Shape]:
    """The grid's prefill then decode shapes, in a fixed order (prompts drawn from the grid's seed)."""
    rng = random.Random(grid.seed)
    for b in grid.prefill_batch_sizes:
        for length in grid.prompt_tokens:
            prompts = [random_prompt(rng, length, vocab_size) for _ in range(b)]
            yield _Shape(PassKind.PREFILL, b, length, partial(partial, engine.prefill, prompts))
    if grid.decode_batch_sizes and grid.context_tokens:
        longest = max(grid.context_tokens)
        base = engine.prefill([random_prompt(rng, longest, vocab_size)])[0].kv
        token = random_prompt(rng, 1, vocab_size)[0]
        for b in grid.decode_batch_sizes:
            for ctx in grid.context_tokens:
                def make(b: int = b, ctx: int = ctx) -> Callable[[], object]:
                    inputs = [DecodeInput(token_id=token, kv=_clone_prefix(base, ctx)) for _ in range(b)]
                    return partial(engine.decode, inputs)

                yield _Shape(PassKind.DECODE, b, ctx, make)


def profile_engine(engine: EngineProtocol, grid: ProfileGrid, vocab_size: int, *, timer: Timer | None = None,
                   on_step: Callable[[str], None] | None = None) -> list[Measurement]:
    """Prefill and decode latencies over the grid (medians); `on_step(label)` after each shape."""
    timer = timer or Timer()
    done = on_step or (lambda _label: None)
    out: list[Measurement] = []
    for shape in _shapes(engine, grid, vocab_size):
        times = timer.run(shape.make(), grid.warmup, grid.repeats)
        out.append(_measurement(shape.kind, shape.batch, shape.tokens, times, timer.last_cpu_s))
        done(shape.label)
    return out


class Contention(Protocol):
    """Neighbours that can be made busy or idle (`profiling.neighbours.Neighbours`)."""

    @property
    def count(self) -> int: ...

    def set_busy(self, busy: bool) -> None: ...


def profile_engine_shared(engine: EngineProtocol, grid: ProfileGrid, vocab_size: int, contention: Contention, *,
                          timer: Timer | None = None, on_step: Callable[[str], None] | None = None
                          ) -> tuple[list[Measurement], list[Measurement]]:
    """Every shape measured alone (neighbours paused), then right after with the neighbours busy.

    Returns (alone, shared), shape for shape in the same order; the neighbours are left paused.
    """
    timer = timer or Timer()
    done = on_step or (lambda _label: None)
    alone: list[Measurement] = []
    shared: list[Measurement] = []
    try:
        for shape in _shapes(engine, grid, vocab_size):
            for busy, out in ((False, alone), (True, shared)):
                contention.set_busy(busy)
                times = timer.run(shape.make(), grid.warmup, grid.repeats)
                out.append(_measurement(shape.kind, shape.batch, shape.tokens, times, timer.last_cpu_s))
            contention.set_busy(False)
            done(shape.label)
    finally:
        contention.set_busy(False)
    return alone, shared


TransferFn = Callable[[dict[str, bytes]], dict[str, float]]  # encoded payload per codec -> median send seconds


def profile_kv(engine: EngineProtocol, codecs: dict[str, KvCodec], grid: ProfileGrid, vocab_size: int, *,
               timer: Timer | None = None, on_step: Callable[[str], None] | None = None,
               transfer: TransferFn | None = None) -> list[KvMeasurement]:
    """Encode/decode cost of one request's KV cache per codec and size (median seconds, bytes before/after),
    and with `transfer` (`kv_link.measure_transfer_s`) the time to ship each encoded cache to another worker."""
    timer = timer or Timer()
    rng = random.Random(grid.seed + 1)
    out: list[KvMeasurement] = []
    for tokens in grid.kv_tokens:
        kv = engine.prefill([random_prompt(rng, tokens, vocab_size)])[0].kv
        raw = int(kv.keys.numel() * kv.keys.element_size() + kv.values.numel() * kv.values.element_size())
        blobs = {name: codec.encode(kv) for name, codec in sorted(codecs.items())}
        sent = transfer(blobs) if transfer is not None else {}
        for name, codec in sorted(codecs.items()):
            blob = blobs[name]
            enc = timer.run(partial(codec.encode, kv), grid.warmup, grid.repeats)
            dec = timer.run(partial(codec.decode, blob), grid.warmup, grid.repeats)
            out.append(KvMeasurement(method=name, tokens=tokens, raw_bytes=raw, encoded_bytes=max(len(blob), 1),
                                     encode_s=max(statistics.median(enc), 1e-9),
                                     decode_s=max(statistics.median(dec), 1e-9),
                                     transfer_s=sent.get(name)))
        if on_step is not None:
            on_step(f"kv tokens={tokens}")
    return out
