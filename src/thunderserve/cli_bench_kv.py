"""bench-kv: what KV compression costs on a real model (bytes, codec speed, greedy-token agreement, logit error).

For each compression level and each prompt set, the prefill KV of every prompt goes through quantize ->
to_bytes -> from_bytes -> dequantize before greedy decoding continues from it; the tokens are compared position
by position with the uncompressed run (EOS ignored: every prompt decodes exactly `num_tokens` tokens), and the
first decode step's logits with the uncompressed first decode step (same input token). `token_agreement` is
free-running (one early flip makes the rest of that prompt disagree; `first_divergence` lists, per prompt, the
first position that differs, `num_tokens` when none does); `token_agreement_teacher_forced` feeds the reference
tokens and counts matching next-token picks (per-step fidelity, without that cascade). Agreements are reported
per prompt set and pooled over all of them.

Why prompts flip: `divergence_gaps` gives, per prompt, the reference's top-1 minus top-2 logit where it first
diverged; `config.reference_min_top2_gap` the smallest such gap over each prompt's decoded tokens (its nearest
tie); `top2_margin_shift_median`/`_p90` how far a level moves the reference's top-2 margin per teacher-forced
decode step. A level flips a prompt when its shift exceeds that prompt's nearest tie. `storage_references` runs
the same for a cache merely stored as bf16 or fp16 (no codec), the yardsticks.

Bytes: `compression_ratio_vs_fp16` is fp16 bytes over payload bytes (every byte: header, codes, scales, zero
points, 16-bit sink tokens) for one real prompt of `ratio_tokens` tokens (default 512, the length the cost model
quotes; the bench prompts joined and cut to length); `compression_ratio_bench_prompts` is the same over the bench
prompts' own caches (~40 tokens each: short prompts pay the per-prompt sink and key parameters over few tokens).
Codec speed is measured on that long cache: bytes of the uncompressed cache (engine dtype) per second, median of
`repeats`.

The CLI (`thunderserve bench-kv --model PATH|smollm2 --json`) calls `bench_kv`; `main()` is a plain argparse
entry point for running this module directly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from thunderserve.runtime.engine.base import DecodeInput, KVCache
from thunderserve.runtime.kv.quantize import dequantize_kv, from_bytes, payload_nbytes, quantize_kv, to_bytes

# Three fixed sets of chat prompts (written before any scheme was measured on them; do not tune them away).
PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "everyday": (
        "What is the capital of France?",
        "Write a short poem about the ocean.",
        "Explain how a refrigerator works.",
        "Give me three tips for learning a new language.",
        "What are the main causes of climate change?",
        "Describe the water cycle in simple terms.",
        "How do I make a cup of green tea?",
        "Summarise the plot of Romeo and Juliet.",
    ),
    "technical": (
        "Write a Python function that checks whether a number is prime.",
        "What is the difference between a list and a tuple in Python?",
        "Explain what a hash table is and why lookups are fast.",
        "How does HTTPS keep a connection private?",
        "What is 17 multiplied by 23? Show your steps.",
        "Explain recursion to a beginner programmer.",
        "What does the SQL JOIN clause do?",
        "Why do computers use binary numbers?",
    ),
    "open": (
        "Tell me a story about a robot who learns to paint.",
        "What should I pack for a weekend camping trip?",
        "Write an email asking my manager for a day off.",
        "Who was Marie Curie and what is she known for?",
        "Compare cats and dogs as pets.",
        "What are some healthy breakfast ideas?",
        "Describe a sunset over the mountains.",
        "How can I improve my sleep?",
    ),
}
DEFAULT_PROMPTS = PROMPT_SETS["everyday"]
COMPRESSIONS = ("int8", "int4")
# Plain 16-bit storage of the cache (no codec): the yardstick for the codecs' agreement, since any lossy cache
# meets the reference run's near-ties (see `divergence_gaps`).
STORAGE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
RATIO_TOKENS = 512


def _prompt_ids(engine: Any, prompts: Sequence[str]) -> list[list[int]]:
    return [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


def _round_trip(kv: KVCache, compression: str) -> KVCache:
    """The cache as the decode side sees it: a codec's wire round trip, or a plain cast for a storage dtype."""
    if compression in STORAGE_DTYPES:
        dt = STORAGE_DTYPES[compression]
        return KVCache(keys=kv.keys.to(dt).to(kv.keys.dtype), values=kv.values.to(dt).to(kv.values.dtype),
                       first_layer=kv.first_layer)
    return dequantize_kv(from_bytes(to_bytes(quantize_kv(kv, compression))), device=kv.keys.device)


def _top2(logits: torch.Tensor) -> tuple[float, int, int]:
    """(top-1 minus top-2 logit: how far the greedy pick was from a tie, top-1 id, top-2 id)."""
    top = torch.topk(logits.float(), 2)
    return float(top.values[0] - top.values[1]), int(top.indices[0]), int(top.indices[1])


class _Run(NamedTuple):
    tokens: list[list[int]]
    first_logits: torch.Tensor | None  # the first decode step's logits [batch, vocab]
    prefill_kvs: list[KVCache]  # exact prefill caches
    gaps: list[list[float]]  # top-1 minus top-2 logit at every step, per prompt
    pairs: list[list[tuple[int, int]]]  # the top-1 and top-2 token ids at every step, per prompt
    margins: list[list[float]]  # with `watch`: logit of the watched top-1 minus the watched top-2, per step


def _greedy(engine: Any, prompt_ids: list[list[int]], num_tokens: int, compression: str | None,
            forced: list[list[int]] | None = None, watch: list[list[tuple[int, int]]] | None = None) -> _Run:
    """Greedy decoding of every prompt from its prefill cache, passed through `compression` (None: exact).

    With `forced`, each step is fed the forced (reference) token instead of the model's own pick, so the
    returned tokens are next-token predictions along the reference continuation (teacher forcing). With
    `watch` (the reference's top-2 pairs), `margins` holds this run's logit difference of each pair.
    """
    results = engine.prefill(prompt_ids)
    prefill_kvs = [KVCache(keys=r.kv.keys.clone(), values=r.kv.values.clone(), first_layer=r.kv.first_layer)
                   for r in results]
    kvs = [r.kv if compression is None else _round_trip(r.kv, compression) for r in results]
    tokens: list[list[int]] = [[] for _ in results]
    gaps: list[list[float]] = [[] for _ in results]
    pairs: list[list[tuple[int, int]]] = [[] for _ in results]
    margins: list[list[float]] = [[] for _ in results]

    def record(i: int, logits: torch.Tensor) -> None:
        gap, a, b = _top2(logits)
        tokens[i].append(a)
        gaps[i].append(gap)
        pairs[i].append((a, b))
        if watch is not None:
            wa, wb = watch[i][len(tokens[i]) - 1]
            margins[i].append(float(logits[wa].float() - logits[wb].float()))

    for i, r in enumerate(results):
        record(i, r.logits)
    fed = [list(seq) for seq in tokens] if forced is None else [[f[0]] for f in forced]
    first_logits = None
    while len(tokens[0]) < num_tokens:
        outs = engine.decode([DecodeInput(seq[-1], kv) for seq, kv in zip(fed, kvs, strict=True)])
        if first_logits is None:
            first_logits = torch.stack(outs)
        for i, o in enumerate(outs):
            record(i, o)
            fed[i].append(tokens[i][-1] if forced is None else forced[i][len(fed[i])])
    return _Run(tokens, first_logits, prefill_kvs, gaps, pairs, margins)


def _agreement(ref: list[list[int]], got: list[list[int]]) -> float:
    same = sum(a == b for r, t in zip(ref, got, strict=True) for a, b in zip(r, t, strict=True))
    return same / sum(len(r) for r in ref)


def _first_divergence(ref: list[list[int]], got: list[list[int]]) -> list[int]:
    return [next((i for i, (a, b) in enumerate(zip(r, t, strict=True)) if a != b), len(r))
            for r, t in zip(ref, got, strict=True)]


def _ratio(kvs: Sequence[KVCache], compression: str) -> float:
    """fp16 bytes of the caches over their payload bytes."""
    fp16 = sum(2 * kv.keys.numel() * 2 for kv in kvs)
    return fp16 / sum(payload_nbytes(quantize_kv(kv, compression)) for kv in kvs)


def _codec_speed(kv: KVCache, compression: str, repeats: int) -> tuple[float, float]:
    """(quantize GB/s, dequantize GB/s) on one cache, in bytes of the uncompressed cache."""
    raw = 2 * kv.keys.numel() * kv.keys.element_size()
    dequantize_kv(quantize_kv(kv, compression))  # warm-up, untimed
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q = quantize_kv(kv, compression)
        t1 = time.perf_counter()
        dequantize_kv(q)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    return raw / statistics.median(enc) / 1e9, raw / statistics.median(dec) / 1e9


def _long_prompt_cache(engine: Any, ids: list[list[int]], num_tokens: int) -> KVCache:
    """The prefill cache of one prompt of `num_tokens` tokens (at most the engine's context): the bench prompts'
    ids joined, cycled, cut."""
    num_tokens = min(num_tokens, int(getattr(engine, "max_context_tokens", num_tokens)))
    flat = [t for p in ids for t in p]
    joined = (flat * (num_tokens // len(flat) + 1))[:num_tokens]
    return engine.prefill([joined])[0].kv


def _fidelity(engine: Any, ids: Mapping[str, list[list[int]]], refs: Mapping[str, _Run], compression: str,
              num_tokens: int, tick: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Agreement (free-running, teacher-forced) and first-step logit error of `compression`, pooled and per set;
    `tick(what)` after each prompt set."""
    per_set: dict[str, Any] = {}
    pooled: dict[str, list[list[int]]] = {"ref": [], "free": [], "forced": []}
    max_err = 0.0
    shifts: list[float] = []  # per teacher-forced step: how far the reference's top-2 margin moved
    for name, p in ids.items():
        ref = refs[name]
        run = _greedy(engine, p, num_tokens, compression)
        teacher = _greedy(engine, p, num_tokens, compression, forced=ref.tokens, watch=ref.pairs)
        forced = teacher.tokens
        shifts += [abs(m - g) for ms, gs in zip(teacher.margins, ref.gaps, strict=True)
                   for m, g in zip(ms[1:], gs[1:], strict=True)]  # step 0 comes from the exact prefill
        assert run.first_logits is not None and ref.first_logits is not None
        err = float((run.first_logits - ref.first_logits).abs().max())
        max_err = max(max_err, err)
        div = _first_divergence(ref.tokens, run.tokens)
        per_set[name] = {"token_agreement": _agreement(ref.tokens, run.tokens),
                         "token_agreement_teacher_forced": _agreement(ref.tokens, forced),
                         "max_logit_error": err, "first_divergence": div,
                         "divergence_gaps": [g[d] if d < len(g) else None for g, d in zip(ref.gaps, div, strict=True)]}
        pooled["ref"] += ref.tokens
        pooled["free"] += run.tokens
        pooled["forced"] += forced
        tick(f"{compression} {name}")
    return {"token_agreement": _agreement(pooled["ref"], pooled["free"]),
            "token_agreement_teacher_forced": _agreement(pooled["ref"], pooled["forced"]),
            "max_logit_error": max_err, "top2_margin_shift_median": statistics.median(shifts),
            "top2_margin_shift_p90": statistics.quantiles(shifts, n=10)[-1] if len(shifts) > 1 else shifts[0],
            "per_set": per_set}


def bench_kv(model: str = "smollm2", num_tokens: int = 64, prompts: list[str] | None = None, *,
             prompt_sets: Mapping[str, Sequence[str]] | None = None, compressions: Sequence[str] = COMPRESSIONS,
             storage_references: Sequence[str] = (), repeats: int = 5, ratio_tokens: int = RATIO_TOKENS,
             engine: Any = None, progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Per compression: compression_ratio_vs_fp16, compression_ratio_bench_prompts, quantize_gbps,
    dequantize_gbps, and pooled token_agreement, token_agreement_teacher_forced, max_logit_error, with the same
    three (and first_divergence, divergence_gaps) per prompt set under "per_set" (see the module docstring).
    `storage_references` (names of STORAGE_DTYPES) adds the same fidelity figures for a cache merely stored in
    that dtype under "storage_reference". `prompts` runs one set named "custom"; by default every set of
    PROMPT_SETS runs. The run's facts are under "config". `progress(done, total, what)` is called as the
    reference and each (level, prompt set) run finish."""
    if num_tokens < 2:
        raise ValueError("num_tokens must be at least 2 (the logit error needs one decode step)")
    if ratio_tokens < 1:
        raise ValueError("ratio_tokens must be at least 1")
    unknown = [r for r in storage_references if r not in STORAGE_DTYPES]
    if unknown:
        raise ValueError(f"unknown storage reference {unknown[0]!r} (known: {', '.join(STORAGE_DTYPES)})")
    if engine is None:
        from thunderserve.runtime.engine import load_engine

        engine = load_engine(model)
    sets = {"custom": list(prompts)} if prompts else {k: list(v) for k, v in (prompt_sets or PROMPT_SETS).items()}
    ids = {name: _prompt_ids(engine, texts) for name, texts in sets.items()}
    total = len(ids) * (1 + len(compressions) + len(storage_references))
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    out: dict[str, Any] = {}
    with torch.no_grad():
        refs: dict[str, _Run] = {}
        for name, p in ids.items():
            refs[name] = _greedy(engine, p, num_tokens, None)
            tick(f"reference {name}")
        prefill_kvs = [kv for run in refs.values() for kv in run.prefill_kvs]
        long_kv = _long_prompt_cache(engine, [p for v in ids.values() for p in v], ratio_tokens)
        first = quantize_kv(long_kv, "int4")
        out["config"] = {"model": model, "num_tokens": num_tokens, "ratio_tokens": long_kv.num_tokens,
                         "prompt_sets": {name: {"num_prompts": len(p), "prompt_tokens": sum(len(x) for x in p)}
                                         for name, p in ids.items()},
                         "kv_dtype": str(long_kv.keys.dtype).removeprefix("torch."),
                         "kv_shape_per_token": list(long_kv.keys.shape[:2]) + [long_kv.keys.shape[3]],
                         "group_size": first.group_size, "sink_tokens": first.sink_tokens,
                         "key_block_tokens": first.key_block_tokens,
                         "reference_min_top2_gap": {name: [min(g) for g in run.gaps] for name, run in refs.items()}}
        for c in compressions:
            q_gbps, dq_gbps = _codec_speed(long_kv, c, repeats)
            out[c] = {"compression_ratio_vs_fp16": _ratio([long_kv], c),
                      "compression_ratio_bench_prompts": _ratio(prefill_kvs, c),
                      "quantize_gbps": q_gbps, "dequantize_gbps": dq_gbps,
                      **_fidelity(engine, ids, refs, c, num_tokens, tick)}
        if storage_references:
            out["storage_reference"] = {r: _fidelity(engine, ids, refs, r, num_tokens, tick)
                                        for r in storage_references}
    return out


def _divergences(s: Mapping[str, Any]) -> str:
    """First divergence per prompt, with the reference's top-2 logit gap there: `12@0.004`; `-` for none."""
    return " ".join("-" if g is None else f"{d}@{g:.3g}"
                    for d, g in zip(s["first_divergence"], s["divergence_gaps"], strict=True))


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a `bench_kv` result: one row per compression (then storage reference) and set."""
    cfg = result["config"]
    nearest = sorted(g for gaps in cfg["reference_min_top2_gap"].values() for g in gaps)
    ties = ", ".join(f"< {t:g}: {sum(g < t for g in nearest)}" for t in (0.01, 0.05, 0.1))
    lines = [f"model={cfg['model']} tokens/prompt={cfg['num_tokens']} kv dtype={cfg['kv_dtype']} "
             f"group={cfg['group_size']} sinks={cfg['sink_tokens']} key block={cfg['key_block_tokens']}",
             f"prompts whose reference run has a near-tie (top-2 logit gap) of {len(nearest)}: {ties}",
             f"{'compression':<12}{'set':<11}{'x fewer bytes':>14}{'(bench)':>9}{'quant GB/s':>11}"
             f"{'dequant GB/s':>13}{'agreement':>10}{'forced':>8}{'max |dlogit|':>13}{'margin shift':>16}"
             "  first divergence@reference top-2 gap (margin shift: median/p90)"]
    entries = [(c, r, False) for c, r in result.items() if c not in ("config", "storage_reference")]
    entries += [(f"{c} store", r, True) for c, r in result.get("storage_reference", {}).items()]
    for c, r, storage in entries:
        rows = [("all", r, "")] + [(n, s, _divergences(s)) for n, s in r["per_set"].items()]
        for name, s, div in rows:
            lead = " " * 47
            if name == "all" and not storage:
                lead = (f"{r['compression_ratio_vs_fp16']:>14.2f}{r['compression_ratio_bench_prompts']:>9.2f}"
                        f"{r['quantize_gbps']:>11.2f}{r['dequantize_gbps']:>13.2f}")
            shift = (f"{r['top2_margin_shift_median']:.4f}/{r['top2_margin_shift_p90']:.4f}".rjust(16)
                     if name == "all" else " " * 16)
            lines.append(f"{c:<12}{name:<11}{lead}{s['token_agreement']:>10.3f}"
                         f"{s['token_agreement_teacher_forced']:>8.3f}{s['max_logit_error']:>13.4f}{shift}  {div}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="KV compression on a real model (bytes, speed, agreement)")
    parser.add_argument("--model", default="smollm2", help="HuggingFace model directory, .gguf file or smollm2")
    parser.add_argument("--num-tokens", type=int, default=64, help="greedy tokens decoded per prompt")
    parser.add_argument("--storage-references", default="",
                        help=f"comma-separated plain storage dtypes to measure too ({', '.join(STORAGE_DTYPES)})")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    refs = [r for r in args.storage_references.split(",") if r]
    result = bench_kv(model=args.model, num_tokens=args.num_tokens, storage_references=refs)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


if __name__ == "__main__":
    main()
