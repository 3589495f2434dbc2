"""Model facts (`LlamaSpec`, read from a HuggingFace config.json) and engine knobs (`EngineConfig`).

Also the RoPE inverse frequencies, including the llama3 and linear `rope_scaling` variants, computed the same
way transformers does so greedy tokens match it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class LlamaSpec:
    """Shape and numerics of a Llama-family causal LM (facts from config.json; no weights)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    max_position_embeddings: int  # context window in tokens
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    rope_params: tuple[tuple[str, float], ...] = ()  # extra scaling parameters (factor, low_freq_factor, ...)
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # q/k/v/o projections carry biases
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type '{self.rope_type}' is not supported (known: {SUPPORTED_ROPE_TYPES})")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> LlamaSpec:
        """Read a HuggingFace Llama config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        model_type = cfg.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"model_type '{model_type}' is not a Llama-family model")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act '{cfg.get('hidden_act')}' is not supported (silu only)")
        heads = int(cfg["num_attention_heads"])
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = dict(cfg.get("rope_scaling") or {})
        rope = {**legacy, **rope}
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = str(rope.pop("rope_type", rope.pop("type", "default")))
        params = tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, int | float)))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        return cls(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
                   intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                   rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_type=rope_type,
                   rope_params=params, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                   mlp_bias=bool(cfg.get("mlp_bias", False)),
                   bos_token_id=None if cfg.get("bos_token_id") is None else int(cfg["bos_token_id"]),
                   eos_token_ids=eos_ids)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict transformers' LlamaForCausalLM loads (inverse of `from_hf_config`)."""
        rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type, **dict(self.rope_params)}
        eos: int | list[int] | None = (None if not self.eos_token_ids else
                                       self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else
                                       list(self.eos_token_ids))
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim, "hidden_act": "silu",
                "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
                "rope_theta": self.rope_theta, "rope_parameters": rope,
                "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
                "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id, "eos_token_id": eos,
                "torch_dtype": "float32"}


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one engine instance: where it runs and which part of the model it holds."""

    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: float32 on CPU, bfloat16 on CUDA
    first_layer: int = 0  # pipeline stage: global layers [first_layer, end_layer)
    end_layer: int | None = None  # None: to the last layer
    tp_rank: int = 0  # tensor parallel: this process's shard index
    tp_size: int = 1  # tensor parallel degree (heads, kv heads and MLP columns split this many ways)
    # pad the packed token rows to a multiple of this so a row's GEMM result does not depend on how many other
    # requests share the batch (MKL picks tail kernels for small row counts); 1 disables it
    row_multiple: int = 4
    kv_block_tokens: int = 32  # KV storage grows in multiples of this many tokens

    def __post_init__(self) -> None:
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} is outside [0, {self.tp_size})")
        if self.first_layer < 0 or (self.end_layer is not None and self.end_layer <= self.first_layer):
            raise ValueError(f"bad layer range [{self.first_layer}, {self.end_layer})")
        if self.row_multiple < 1 or self.kv_block_tokens < 1:
            raise ValueError("row_multiple and kv_block_tokens must be positive")

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if self.device.startswith("cuda") else torch.float32


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] (float32), with llama3 / linear scaling applied like transformers."""
    dim = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))
    p = dict(spec.rope_params)
    if spec.rope_type == "linear":
        return inv / p.get("factor", 1.0)
    if spec.rope_type != "llama3":
        return inv
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_ctx = p.get("original_max_position_embeddings", float(spec.max_position_embeddings))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
