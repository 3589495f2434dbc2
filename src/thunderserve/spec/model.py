"""Model architecture facts (Llama family) from the catalog or any HuggingFace config.json."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from thunderserve.errors import SpecError

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "fp16": 2, "bf16": 2, "fp32": 4}


class ModelSpec(BaseModel):
    """Decoder-only transformer shape. Derived byte/FLOP counts are properties (units in names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_context_tokens: int = Field(default=4096, gt=0)
    dtype_bytes: int = Field(default=2, gt=0)  # bytes per weight/activation/KV element
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def params_per_layer(self) -> int:
        """Attention (q, k, v, o with GQA) + SwiGLU MLP (gate, up, down) weights of one layer."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        return h * h * 2 + h * kv * 2 + 3 * h * self.intermediate_size

    @property
    def embedding_params(self) -> int:
        """Input embedding plus LM head (shared when tied)."""
        n = self.vocab_size * self.hidden_size
        return n if self.tie_word_embeddings else 2 * n

    @property
    def num_params(self) -> int:
        return self.num_layers * self.params_per_layer + self.embedding_params

    @property
    def layer_weight_bytes(self) -> int:
        return self.params_per_layer * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V for one token in one layer (GQA aware), uncompressed."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.num_layers


@cache
def model_catalog() -> dict[str, ModelSpec]:
    text = resources.files("thunderserve.spec").joinpath("catalog/models.yaml").read_text()
    return {m["name"]: ModelSpec.model_validate(m) for m in yaml.safe_load(text)["models"]}


def model_from_hf_config(path: Path) -> ModelSpec:
    """Read layers, hidden, heads, kv heads, ffn, vocab and dtype from a HuggingFace config.json."""
    source = str(path)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError("file not found", source=source) from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"malformed JSON at line {exc.lineno}: {exc.msg}", source=source) from None
    if not isinstance(cfg, dict):
        raise SpecError("expected a JSON object", source=source)
    required = ["num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"]
    for key in required:
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise SpecError("missing or not a positive integer", source=source, field=key)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    if dtype not in _DTYPE_BYTES:
        raise SpecError(f"unsupported dtype '{dtype}'", source=source, field="torch_dtype")
    name = path.parent.name if path.name == "config.json" else path.stem
    try:
        return ModelSpec(
            name=name or "model",
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_context_tokens=cfg.get("max_position_embeddings", 4096),
            dtype_bytes=_DTYPE_BYTES[dtype],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except ValueError as exc:
        raise SpecError(str(exc).splitlines()[-1].strip(), source=source) from None


def load_model(ref: str) -> ModelSpec:
    """A catalog name, or a path to a config.json (or a directory holding one)."""
    catalog = model_catalog()
    if ref.lower() in catalog:
        return catalog[ref.lower()]
    path = Path(ref)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        return model_from_hf_config(path)
    known = ", ".join(catalog)
    raise SpecError(f"unknown model '{ref}' (catalog: {known}; or give a config.json path)", field="model")
