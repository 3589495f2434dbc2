"""`LlamaEngine`: the `EngineProtocol` implementation (batched prefill and decode, per-request KV caches).

One engine holds one pipeline stage (global layers [first_layer, end_layer)) of one tensor-parallel shard:

* first stage: takes token ids (`prefill`, `decode`) and embeds them;
* later stages: take hidden states from the previous stage (`prefill_hidden`, `decode_hidden`);
* last stage: ends with the final norm and lm_head and returns float32 logits of each sequence's last token;
  other stages return hidden states [new tokens, hidden] of every new token (what the next stage consumes).

`PrefillResult.logits` therefore holds logits on the last stage and hidden states elsewhere, as `base` says.
A whole model is one stage that is both first and last. Every call may mix sequences at any context length;
each sequence's KV lives in its own `KVCache` (keys/values are prefix views of a `KVBuffer` with spare room,
so decode appends without copying). The caller owns the caches: export one after prefill, import it
elsewhere, and pass it back to `decode` to continue it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from thunderserve.runtime.engine.base import DecodeInput, KVBuffer, KVCache, PrefillResult
from thunderserve.runtime.engine.config import EngineConfig, LlamaSpec, rope_inv_freq
from thunderserve.runtime.engine.model import (
    AllReduce,
    SeqSlot,
    ShardShape,
    StageWeights,
    final_logits,
    layer_forward,
    pad_rows,
)
from thunderserve.runtime.engine.text import TextCodec


@dataclass(frozen=True)
class StepItem:
    """One sequence's input to a forward pass: new token ids (first stage) or hidden states (later stages)."""

    token_ids: Sequence[int] | None = None  # first stage
    hidden: torch.Tensor | None = None  # [new tokens, hidden]; later stages
    kv: KVCache | None = None  # None: a new sequence (empty cache)

    @property
    def num_new(self) -> int:
        if self.token_ids is not None:
            return len(self.token_ids)
        assert self.hidden is not None
        return int(self.hidden.shape[0])


class LlamaEngine:
    """A Llama-family model stage ready for batched prefill/decode (see the module docstring)."""

    def __init__(self, spec: LlamaSpec, weights: StageWeights, shape: ShardShape, config: EngineConfig,
                 text: TextCodec | None = None, all_reduce: AllReduce | None = None) -> None:
        self.spec = spec
        self.weights = weights
        self.shape = shape
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.resolved_dtype()
        self.first_layer = config.first_layer
        self.end_layer = config.end_layer if config.end_layer is not None else spec.num_layers
        self.text = text
        self._all_reduce = all_reduce
        self._inv_freq = rope_inv_freq(spec).to(self.device)
        self._cos = torch.empty(0, spec.head_dim, dtype=self.dtype, device=self.device)
        self._sin = torch.empty(0, spec.head_dim, dtype=self.dtype, device=self.device)
        self._weights_token = int.from_bytes(os.urandom(7), "big")  # drawn once per load

    # ----- facts -------------------------------------------------------------------------------------------
    @property
    def weights_token(self) -> int:
        return self._weights_token

    @property
    def max_context_tokens(self) -> int:
        return self.spec.max_position_embeddings

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.spec.eos_token_ids

    @property
    def is_first_stage(self) -> bool:
        return self.first_layer == 0

    @property
    def is_last_stage(self) -> bool:
        return self.end_layer == self.spec.num_layers

    @property
    def num_stage_layers(self) -> int:
        return self.end_layer - self.first_layer

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    # ----- text --------------------------------------------------------------------------------------------
    def _codec(self) -> TextCodec:
        if self.text is None:
            raise RuntimeError("this model directory has no tokenizer")
        return self.text

    def encode(self, text: str) -> list[int]:
        return self._codec().encode(text)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self._codec().decode(token_ids)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return self._codec().apply_chat_template(messages)

    # ----- EngineProtocol ----------------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        """New sequences from token ids (first stage); last-token logits (or all hidden states) and each KV."""
        outs, caches = self.forward([StepItem(token_ids=list(p)) for p in prompts])
        return [PrefillResult(logits=o, kv=kv) for o, kv in zip(outs, caches, strict=True)]

    def decode(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]:
        """One token per sequence (first stage); extends each `inp.kv` in place."""
        return self.forward([StepItem(token_ids=[inp.token_id], kv=inp.kv) for inp in inputs])[0]

    # ----- pipeline stages after the first -----------------------------------------------------------------
    def prefill_hidden(self, hidden: Sequence[torch.Tensor]) -> list[PrefillResult]:
        """New sequences from the previous stage's hidden states (one [tokens, hidden] tensor per sequence)."""
        outs, caches = self.forward([StepItem(hidden=h) for h in hidden])
        return [PrefillResult(logits=o, kv=kv) for o, kv in zip(outs, caches, strict=True)]

    def decode_hidden(self, hidden: torch.Tensor, kvs: Sequence[KVCache]) -> list[torch.Tensor]:
        """One decode step from the previous stage's hidden states [batch, hidden]; extends each KV in place."""
        return self.forward([StepItem(hidden=hidden[i:i + 1], kv=kv) for i, kv in enumerate(kvs)])[0]

    # ----- the general step --------------------------------------------------------------------------------
    def forward(self, items: Sequence[StepItem], every_token: bool = False
                ) -> tuple[list[torch.Tensor], list[KVCache]]:
        """Run new tokens of several sequences (any mix of prefill and decode) through this stage.

        Returns, per item, float32 logits [vocab] of its last new token (last stage) or hidden states
        [new tokens, hidden] (other stages), and its KV cache (the item's own, extended, or a new one).
        With `every_token` (last stage), the logits of every new token instead, [new tokens, vocab]: scoring a
        text teacher-forced (`thunderserve.quality.perplexity`).
        """
        if not items:
            return [], []
        slots, caches = [], []
        row = 0
        for it in items:
            n = it.num_new
            if n <= 0:
                raise ValueError("empty prompt")
            if (it.token_ids if self.is_first_stage else it.hidden) is None:
                raise ValueError("the first stage takes token ids; later stages take hidden states")
            kv, buf, past = self._reserve(it.kv, n)
            slots.append(SeqSlot(row_start=row, num_new=n, past_tokens=past, buffer=buf))
            caches.append(kv)
            row += n
        with torch.no_grad():
            x = self._embed(items)
            positions = torch.cat([torch.arange(s.past_tokens, s.past_tokens + s.num_new) for s in slots])
            x = pad_rows(x, self.config.row_multiple)
            positions = torch.cat([positions, positions.new_zeros(x.shape[0] - row)]).to(self.device)
            cos, sin = self._rope(positions)
            for i, w in enumerate(self.weights.layers):
                x = layer_forward(w, self.shape, i, x, cos, sin, slots, self._all_reduce)
            if self.is_last_stage and every_token:
                eps, rows_multiple = self.spec.rms_norm_eps, self.config.row_multiple
                outs = [final_logits(self.weights, x[s.row_start: s.row_start + s.num_new], eps, rows_multiple)
                        for s in slots]
            elif self.is_last_stage:
                last = torch.tensor([s.row_start + s.num_new - 1 for s in slots], device=self.device)
                logits = final_logits(self.weights, x[last], self.spec.rms_norm_eps, self.config.row_multiple)
                outs = list(logits.unbind(0))
            else:
                outs = [x[s.row_start: s.row_start + s.num_new] for s in slots]
        for s, kv in zip(slots, caches, strict=True):
            total = s.past_tokens + s.num_new
            s.buffer.num_tokens = total
            kv.keys = s.buffer.keys[:, :, :total]
            kv.values = s.buffer.values[:, :, :total]
            kv.buffer = s.buffer
        return outs, caches

    def _embed(self, items: Sequence[StepItem]) -> torch.Tensor:
        if self.is_first_stage:
            assert self.weights.embed is not None
            ids = torch.tensor([t for it in items for t in (it.token_ids or [])], dtype=torch.long,
                               device=self.device)
            if int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size:
                raise ValueError(f"token id out of range [0, {self.spec.vocab_size})")
            return torch.nn.functional.embedding(ids, self.weights.embed)
        return torch.cat([it.hidden.to(device=self.device, dtype=self.dtype) for it in items
                          if it.hidden is not None])

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows [rows, head_dim] for the given positions, from a table grown in powers of two."""
        need = int(positions.max()) + 1
        if need > self._cos.shape[0]:
            size = max(64, 1 << (need - 1).bit_length())
            freqs = torch.arange(size, dtype=torch.float32, device=self.device)[:, None] * self._inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return self._cos[positions], self._sin[positions]

    def _reserve(self, kv: KVCache | None, num_new: int) -> tuple[KVCache, KVBuffer, int]:
        """The cache to extend, storage with room for `num_new` more tokens, and the tokens already there."""
        layers, heads, d = self.num_stage_layers, self.shape.num_kv_heads, self.shape.head_dim
        past = 0 if kv is None else kv.num_tokens
        if past + num_new > self.max_context_tokens:
            raise ValueError(f"context of {past + num_new} tokens exceeds the model's {self.max_context_tokens}")
        if kv is not None:
            if tuple(kv.keys.shape) != (layers, heads, past, d) or kv.keys.shape != kv.values.shape:
                raise ValueError(f"KV cache shape {tuple(kv.keys.shape)} does not fit this stage "
                                 f"({layers} layers, {heads} kv heads, head_dim {d})")
            if kv.first_layer != self.first_layer:
                raise ValueError(f"KV cache starts at layer {kv.first_layer}, this stage at {self.first_layer}")
            buf = kv.buffer
            if (buf is not None and buf.num_tokens == past and past + num_new <= buf.capacity_tokens
                    and kv.keys.data_ptr() == buf.keys.data_ptr() and kv.values.data_ptr() == buf.values.data_ptr()
                    and kv.keys.stride() == buf.keys.stride() and kv.values.stride() == buf.values.stride()):
                return kv, buf, past
        block = self.config.kv_block_tokens
        need = past + num_new
        cap = -(-(need + max(block, need // 4)) // block) * block
        cap = max(min(cap, self.max_context_tokens), need)
        keys = torch.empty(layers, heads, cap, d, dtype=self.dtype, device=self.device)
        values = torch.empty_like(keys)
        if kv is None:
            kv = KVCache(keys=keys[:, :, :0], values=values[:, :, :0], first_layer=self.first_layer)
        elif past:
            keys[:, :, :past] = kv.keys
            values[:, :, :past] = kv.values
        return kv, KVBuffer(keys=keys, values=values, num_tokens=past), past
