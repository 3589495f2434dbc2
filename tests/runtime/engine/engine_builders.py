"""Builders for engine tests: tiny random-weight Llama checkpoints written with transformers (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "had they you were their one all we can her has there been hello world user assistant system good day "
         "how fine thanks what time tell me a story once upon cat dog ran far away").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def make_tiny_llama(path: Path, *, seed: int = 0, num_layers: int = 2, vocab_extra: int = 200,
                    tie_word_embeddings: bool = False, max_context_tokens: int = 256,
                    rope_parameters: dict[str, Any] | None = None, init_range: float = 0.2) -> Path:
    """Save a tiny LlamaForCausalLM (hidden 64, 4 heads, 2 kv heads) plus a word-level tokenizer to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = SPECIALS + WORDS + [f"w{i}" for i in range(vocab_extra)]
    vocab = {tok: i for i, tok in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    kwargs: dict[str, Any] = {}
    if rope_parameters is not None:
        kwargs["rope_parameters"] = rope_parameters
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_context_tokens,
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                         tie_word_embeddings=tie_word_embeddings, initializer_range=init_range,
                         torch_dtype="float32", **kwargs)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def hf_model(path: Path) -> Any:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate (no EOS stop: the continuation is always max_new_tokens long)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             eos_token_id=None, pad_token_id=0)
    return [int(t) for t in out[0, len(prompt_ids):]]


def engine_greedy(engine: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decode through the raw engine API (prefill, then one decode per token)."""
    from thunderserve.runtime.engine.base import DecodeInput

    res = engine.prefill([prompt_ids])[0]
    kv, out = res.kv, [int(res.logits.argmax())]
    while len(out) < max_new_tokens:
        out.append(int(engine.decode([DecodeInput(out[-1], kv)])[0].argmax()))
    return out


def write_tiny_gguf(hf_dir: Path, out: Path, quantized: bool = False) -> Path:
    """A llama.cpp-style GGUF of a tiny HF checkpoint (q/k rows permuted as llama.cpp does; F32 or Q8_0)."""
    import json

    import gguf
    from safetensors.torch import load_file

    from thunderserve.runtime.engine.gguf_convert import permute_qk

    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for name, t in sorted(load_file(str(hf_dir / "model.safetensors")).items()):
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{per_layer[module]}.{kind}"
        else:
            gname = names[name]
        if name.endswith("q_proj.weight"):
            t = permute_qk(t, heads)
        elif name.endswith("k_proj.weight"):
            t = permute_qk(t, kv_heads)
        arr = t.to(torch.float32).numpy()
        if quantized and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
