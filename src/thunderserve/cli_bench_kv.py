"""bench-kv: what KV compression costs on a real model (bytes, codec speed, greedy-token agreement, logit error).

For each compression level, the prefill KV of every prompt goes through quantize -> to_bytes -> from_bytes ->
dequantize before greedy decoding continues from it; the tokens are compared position by position with the
uncompressed run (EOS ignored: every prompt decodes exactly `num_tokens` tokens), and the first decode step's
logits with the uncompressed first decode step (same input token). `token_agreement` is free-running (one
early flip makes the rest of that prompt disagree); `token_agreement_teacher_forced` feeds the reference
tokens and counts matching next-token picks (per-step fidelity, without that cascade). Codec speed is measured on the reference
run's final caches (prompt + generated tokens): bytes of the uncompressed cache (engine dtype) per second,
median of `repeats`; the compression ratio is fp16 bytes of those caches over the payload bytes.

The CLI (`thunderserve bench-kv --model PATH|smollm2 --json`) calls `bench_kv`; `main()` is a plain argparse
entry point for running this module directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from thunderserve.runtime.engine.base import DecodeInput, KVCache
from thunderserve.runtime.kv.quantize import dequantize_kv, from_bytes, payload_nbytes, quantize_kv, to_bytes

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the ocean.",
    "Explain how a refrigerator works.",
    "Give me three tips for learning a new language.",
    "What are the main causes of climate change?",
    "Describe the water cycle in simple terms.",
    "How do I make a cup of green tea?",
    "Summarise the plot of Romeo and Juliet.",
)
COMPRESSIONS = ("int8", "int4")


def _prompt_ids(engine: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


def _greedy(engine: Any, prompt_ids: list[list[int]], num_tokens: int, compression: str | None,
            forced: list[list[int]] | None = None) -> tuple[list[list[int]], torch.Tensor | None, list[KVCache]]:
    """Greedy tokens per prompt, the first decode step's logits [batch, vocab], and the exact caches.

    With `forced`, each step is fed the forced (reference) token instead of the model's own pick, so the
    returned tokens are next-token predictions along the reference continuation (teacher forcing).
    """
    results = engine.prefill(prompt_ids)
    prefill_kvs = [r.kv for r in results]
    kvs = [r.kv if compression is None else
           dequantize_kv(from_bytes(to_bytes(quantize_kv(r.kv, compression))), device=r.kv.keys.device)
           for r in results]
    tokens = [[int(r.logits.argmax())] for r in results]
    fed = [list(seq) for seq in tokens] if forced is None else [[f[0]] for f in forced]
    first_logits = None
    while len(tokens[0]) < num_tokens:
        outs = engine.decode([DecodeInput(seq[-1], kv) for seq, kv in zip(fed, kvs, strict=True)])
        if first_logits is None:
            first_logits = torch.stack(outs)
        for i, o in enumerate(outs):
            tokens[i].append(int(o.argmax()))
            fed[i].append(tokens[i][-1] if forced is None else forced[i][len(fed[i])])
    return tokens, first_logits, prefill_kvs


def _agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    same = sum(a == b for r, t in zip(ref, got, strict=True) for a, b in zip(r, t, strict=True))
    return same / sum(len(r) for r in ref)


def _codec_speed(kvs: list[KVCache], compression: str, repeats: int) -> tuple[float, float, float]:
    """(compression ratio vs fp16, quantize GB/s, dequantize GB/s) over the given caches."""
    raw = sum(2 * kv.keys.numel() * kv.keys.element_size() for kv in kvs)
    fp16 = sum(2 * kv.keys.numel() * 2 for kv in kvs)
    qs = [quantize_kv(kv, compression) for kv in kvs]
    packed = sum(payload_nbytes(q) for q in qs)
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        qs = [quantize_kv(kv, compression) for kv in kvs]
        t1 = time.perf_counter()
        for q in qs:
            dequantize_kv(q)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return fp16 / packed, raw / statistics.median(enc) / 1e9, raw / statistics.median(dec) / 1e9


def bench_kv(model: str = "smollm2", num_tokens: int = 64, prompts: list[str] | None = None, *,
             compressions: Sequence[str] = COMPRESSIONS, repeats: int = 5, engine: Any = None) -> dict[str, Any]:
    """Per compression: compression_ratio_vs_fp16, quantize_gbps, dequantize_gbps, token_agreement,
    token_agreement_teacher_forced, max_logit_error (see the module docstring); the run's facts under "config"."""
    if num_tokens < 2:
        raise ValueError("num_tokens must be at least 2 (the logit error needs one decode step)")
    if engine is None:
        from thunderserve.runtime.engine import load_engine

        engine = load_engine(model)
    texts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    ids = _prompt_ids(engine, texts)
    with torch.no_grad():
        ref_tokens, ref_logits, kvs = _greedy(engine, ids, num_tokens, None)
        out: dict[str, Any] = {"config": {"model": model, "num_prompts": len(ids), "num_tokens": num_tokens,
                                          "prompt_tokens": sum(len(p) for p in ids),
                                          "kv_dtype": str(kvs[0].keys.dtype).removeprefix("torch."),
                                          "group_size": quantize_kv(kvs[0], "int4").group_size}}
        for c in compressions:
            tokens, logits, _ = _greedy(engine, ids, num_tokens, c)
            forced, _, _ = _greedy(engine, ids, num_tokens, c, forced=ref_tokens)
            ratio, q_gbps, dq_gbps = _codec_speed(kvs, c, repeats)
            assert logits is not None and ref_logits is not None
            out[c] = {"compression_ratio_vs_fp16": ratio, "quantize_gbps": q_gbps, "dequantize_gbps": dq_gbps,
                      "token_agreement": _agreement(ref_tokens, tokens),
                      "token_agreement_teacher_forced": _agreement(ref_tokens, forced),
                      "max_logit_error": float((logits - ref_logits).abs().max())}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KV compression on a real model (bytes, speed, agreement)")
    parser.add_argument("--model", default="smollm2", help="HuggingFace model directory, .gguf file or smollm2")
    parser.add_argument("--num-tokens", type=int, default=64, help="greedy tokens decoded per prompt")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = bench_kv(model=args.model, num_tokens=args.num_tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"model={args.model} prompts={result['config']['num_prompts']} tokens/prompt={args.num_tokens} "
          f"kv dtype={result['config']['kv_dtype']}")
    print(f"{'compression':<12}{'ratio vs fp16':>14}{'quant GB/s':>12}{'dequant GB/s':>14}{'agreement':>11}"
          f"{'forced agr.':>12}{'max logit err':>15}")
    for c in COMPRESSIONS:
        r = result[c]
        print(f"{c:<12}{r['compression_ratio_vs_fp16']:>14.2f}{r['quantize_gbps']:>12.2f}{r['dequantize_gbps']:>14.2f}"
              f"{r['token_agreement']:>11.3f}{r['token_agreement_teacher_forced']:>12.3f}"
              f"{r['max_logit_error']:>15.4f}")


if __name__ == "__main__":
    main()
