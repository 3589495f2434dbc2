"""Read a HuggingFace Llama checkpoint (*.safetensors) into `StageWeights` for one pipeline stage and TP shard.

Only the tensors (and, for tensor parallelism, the row/column slices) this stage needs are read, through
safetensors' lazy `safe_open`, so a stage of a big model does not load the whole checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from thunderserve.runtime.engine.config import LlamaSpec
from thunderserve.runtime.engine.model import LayerWeights, ShardShape, StageWeights


@dataclass(frozen=True)
class ShardPlan:
    """Which slice of the model one engine holds: layers [first_layer, end_layer) and TP shard tp_rank/tp_size."""

    first_layer: int
    end_layer: int
    tp_rank: int = 0
    tp_size: int = 1

    def shape(self, spec: LlamaSpec) -> ShardShape:
        for name, n in (("num_heads", spec.num_heads), ("num_kv_heads", spec.num_kv_heads),
                        ("intermediate_size", spec.intermediate_size)):
            if n % self.tp_size:
                raise ValueError(f"tensor parallel degree {self.tp_size} does not divide {name}={n}")
        return ShardShape(num_heads=spec.num_heads // self.tp_size, num_kv_heads=spec.num_kv_heads // self.tp_size,
                          head_dim=spec.head_dim, intermediate=spec.intermediate_size // self.tp_size,
                          rms_norm_eps=spec.rms_norm_eps)

    def is_first(self) -> bool:
        return self.first_layer == 0

    def is_last(self, spec: LlamaSpec) -> bool:
        return self.end_layer == spec.num_layers


class SafetensorsDir:
    """Lazy access to the tensors of every *.safetensors file in a directory, by name."""

    def __init__(self, path: Path) -> None:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {path}")
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for f in files:
            h = safe_open(str(f), framework="pt")
            self._handles[str(f)] = h
            for key in h.keys():
                self._where[key] = str(f)

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
            ) -> torch.Tensor:
        """The tensor `name`, optionally only rows [lo, hi) (dim 0) or columns [lo, hi) (dim 1)."""
        if name not in self._where:
            raise KeyError(f"tensor '{name}' is not in the checkpoint")
        sl = self._handles[self._where[name]].get_slice(name)
        if rows is not None:
            return sl[rows[0]:rows[1]]
        if cols is not None:
            return sl[:, cols[0]:cols[1]]
        return sl[:]


def read_hf_config(path: Path) -> dict[str, Any]:
    """config.json, with generation_config.json's eos ids merged in (instruct models stop on several)."""
    cfg: dict[str, Any] = json.loads((path / "config.json").read_text())
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
        if gen_eos is not None:
            base = cfg.get("eos_token_id")
            ids = [*(base if isinstance(base, list) else [] if base is None else [base]),
                   *(gen_eos if isinstance(gen_eos, list) else [gen_eos])]
            cfg["eos_token_id"] = list(dict.fromkeys(int(i) for i in ids))
    return cfg


def load_stage_weights(src: SafetensorsDir, spec: LlamaSpec, plan: ShardPlan, device: torch.device,
                       dtype: torch.dtype) -> StageWeights:
    """Read this stage's (and TP shard's) tensors, fusing q/k/v and gate/up, cast to `dtype` on `device`."""
    shape = plan.shape(spec)
    r, d = plan.tp_rank, spec.head_dim
    q_rows = (r * shape.num_heads * d, (r + 1) * shape.num_heads * d)
    kv_rows = (r * shape.num_kv_heads * d, (r + 1) * shape.num_kv_heads * d)
    mlp_rows = (r * shape.intermediate, (r + 1) * shape.intermediate)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    def opt(name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        return put(src.get(name, rows=rows)) if src.has(name) else None

    def cat_opt(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise ValueError("either all or none of the fused projections must have biases")
        return torch.cat([p for p in parts if p is not None])

    layers = []
    for i in range(plan.first_layer, plan.end_layer):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        qkv = torch.cat([src.get(a + "q_proj.weight", rows=q_rows), src.get(a + "k_proj.weight", rows=kv_rows),
                         src.get(a + "v_proj.weight", rows=kv_rows)])
        qkv_bias = cat_opt([opt(a + "q_proj.bias", q_rows), opt(a + "k_proj.bias", kv_rows),
                            opt(a + "v_proj.bias", kv_rows)])
        gate_up = torch.cat([src.get(m + "gate_proj.weight", rows=mlp_rows), src.get(m + "up_proj.weight", rows=mlp_rows)])
        gate_up_bias = cat_opt([opt(m + "gate_proj.bias", mlp_rows), opt(m + "up_proj.bias", mlp_rows)])
        layers.append(LayerWeights(
            input_norm=put(src.get(p + "input_layernorm.weight")), qkv=put(qkv), qkv_bias=qkv_bias,
            o=put(src.get(a + "o_proj.weight", cols=q_rows)), o_bias=opt(a + "o_proj.bias"),
            post_norm=put(src.get(p + "post_attention_layernorm.weight")), gate_up=put(gate_up),
            gate_up_bias=gate_up_bias, down=put(src.get(m + "down_proj.weight", cols=mlp_rows)),
            down_bias=opt(m + "down_proj.bias")))
    first, last = plan.is_first(), plan.is_last(spec)
    tied = spec.tie_word_embeddings or not src.has("lm_head.weight")
    embed = put(src.get("model.embed_tokens.weight")) if first or (last and tied) else None
    lm_head: torch.Tensor | None = None
    if last:
        lm_head = embed if tied else put(src.get("lm_head.weight"))
    return StageWeights(layers=layers, embed=embed if first else None,
                        norm=put(src.get("model.norm.weight")) if last else None, lm_head=lm_head)
