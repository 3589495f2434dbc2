"""A plan group with several pipeline stages, served by one worker process: one engine per stage and device.

`PipelineEngine` implements `EngineProtocol` over stage engines (each a `LlamaEngine` loaded for its layer range
on its own device): prefill and decode run stage after stage, handing hidden states across devices. The
weights of each stage live only on that stage's device, which is what pipeline parallelism buys (a model too
big for one GPU). Tensor parallelism (several GPUs per stage) wraps this one level up: each TP rank holds a
`PipelineEngine` of its shards of every stage, and `workers.tensor_parallel` drives the ranks in step.

KV caches. Each request keeps one cache per stage. Towards the worker a request's cache is one `PipelineKV`
whose `keys`/`values` are the stages' layers concatenated (what gets shipped to a decode group, whatever its
own layout); a cache imported from elsewhere (all layers in one tensor) is split by layer range on its first
decode step, once.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from thunderserve.runtime.engine.base import DecodeInput, KVCache, PrefillResult


class StageEngine(Protocol):
    """What a pipeline stage offers (as `LlamaEngine` does)."""

    first_layer: int
    end_layer: int
    device: torch.device

    @property
    def weights_token(self) -> int: ...

    @property
    def max_context_tokens(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode_text(self, token_ids: Sequence[int]) -> str: ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]: ...

    def decode(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]: ...

    def prefill_hidden(self, hidden: Sequence[torch.Tensor]) -> list[PrefillResult]: ...

    def decode_hidden(self, hidden: torch.Tensor, kvs: Sequence[KVCache]) -> list[torch.Tensor]: ...


class PipelineKV(KVCache):
    """A request's cache across stages; `keys`/`values` concatenate the stages' layers (on the first device)."""

    def __init__(self, parts: list[KVCache]) -> None:  # noqa: D107 - no dataclass init: keys/values are derived
        self.parts = parts
        self.first_layer = parts[0].first_layer
        self.buffer = None

    @property
    def keys(self) -> torch.Tensor:  # type: ignore[override]
        dev = self.parts[0].keys.device
        return torch.cat([p.keys.to(dev) for p in self.parts], dim=0)

    @property
    def values(self) -> torch.Tensor:  # type: ignore[override]
        dev = self.parts[0].values.device
        return torch.cat([p.values.to(dev) for p in self.parts], dim=0)

    @property
    def num_tokens(self) -> int:
        return self.parts[0].num_tokens


class PipelineEngine:
    """`EngineProtocol` over consecutive stage engines (layers [0, L) split in order)."""

    def __init__(self, stages: Sequence[StageEngine]) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        expect = 0
        for st in stages:
            if st.first_layer != expect:
                raise ValueError(f"stage layers must be consecutive: expected a stage at layer {expect}, "
                                 f"got {st.first_layer}")
            expect = st.end_layer
        self.stages = list(stages)
        self._split: dict[int, list[KVCache]] = {}  # id(imported cache) -> its per-stage parts
        self._weights_token = hash(tuple(st.weights_token for st in self.stages)) & ((1 << 63) - 1)

    # ---- facts and text (from the first stage, which holds the tokenizer) ----------------------------------
    @property
    def weights_token(self) -> int:
        return self._weights_token

    @property
    def max_context_tokens(self) -> int:
        return self.stages[0].max_context_tokens

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.stages[0].eos_token_ids

    def encode(self, text: str) -> list[int]:
        return self.stages[0].encode(text)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self.stages[0].decode_text(token_ids)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.stages[0].apply_chat_template(messages)

    # ---- compute ------------------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        results = self.stages[0].prefill(prompts)
        parts = [[r.kv] for r in results]
        for st in self.stages[1:]:
            results = st.prefill_hidden([r.logits.to(st.device) for r in results])
            for p, r in zip(parts, results, strict=True):
                p.append(r.kv)
        return [PrefillResult(logits=r.logits, kv=PipelineKV(p)) for r, p in zip(results, parts, strict=True)]

    def decode(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]:
        parts = [self._parts(inp.kv) for inp in inputs]
        outs = self.stages[0].decode([DecodeInput(inp.token_id, p[0]) for inp, p in zip(inputs, parts, strict=True)])
        for i, st in enumerate(self.stages[1:], start=1):
            hidden = torch.cat([o.reshape(1, -1).to(st.device) for o in outs], dim=0)
            outs = st.decode_hidden(hidden, [p[i] for p in parts])
        return outs

    def _parts(self, kv: KVCache) -> list[KVCache]:
        if isinstance(kv, PipelineKV):
            return kv.parts
        key = id(kv)
        if key not in self._split:
            self._split[key] = self._split_kv(kv)
            weakref.finalize(kv, self._split.pop, key, None)  # forget the parts when the request's cache goes
        return self._split[key]

    def _split_kv(self, kv: KVCache) -> list[KVCache]:
        """Cut an all-layer cache (e.g. imported from a prefill group with another layout) into stage parts."""
        base = kv.first_layer
        if base != 0 or kv.keys.shape[0] != self.stages[-1].end_layer:
            raise ValueError(f"cache covers layers [{base}, {base + kv.keys.shape[0]}), the pipeline needs "
                             f"[0, {self.stages[-1].end_layer})")
        return [KVCache(keys=kv.keys[st.first_layer:st.end_layer].to(st.device).contiguous(),
                        values=kv.values[st.first_layer:st.end_layer].to(st.device).contiguous(),
                        first_layer=st.first_layer) for st in self.stages]


def load_pipeline(model: str, stages: Sequence[tuple[int, int, str]], load: Any = None) -> PipelineEngine:
    """Load one engine per (first_layer, end_layer, device) with `runtime.engine.load_engine` (or `load`)."""
    if load is None:
        from thunderserve.runtime.engine import load_engine as load
    return PipelineEngine([load(model, device=dev, first_layer=a, end_layer=b) for a, b, dev in stages])
