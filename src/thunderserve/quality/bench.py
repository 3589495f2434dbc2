"""bench-kv: the quality gate's measurements for every compression level and the 16-bit storage yardsticks.

Per level (`none`, `int8`, `int4`; yardsticks `bf16-storage`, `fp16-storage`: a cache merely stored in 16 bits):
  * on the fixed corpus (`perplexity`): perplexity, perplexity_delta_rel, teacher_forced_agreement, kl_mean;
  * on 24 fixed chat prompts (`greedy`): free_running_agreement, first_divergence, prompts_diverged;
  * compression_ratio_vs_fp16 {"512", "2048"}: fp16 bytes over payload bytes (every byte: header, codes, scales,
    zero points, 16-bit windows) of a real corpus prompt of that many tokens, its cache held in fp16 as GPU
    servers hold it (the yardsticks: 1.0);
  * quantize_gbps / dequantize_gbps: bytes of the 2,048-token cache (engine dtype) per second through
    quantize_kv / dequantize_kv (a cast to the 16-bit dtype and back for the yardsticks), median of `repeats`;
  * passes_gate (`gate.GATE`).
Result shape: {"gate": {thresholds}, "config": {...}, "levels": {level: {...}}}. Work is fixed by the corpus
budget, the prompts and `num_tokens`, never by time; `progress(done, total, what)` ticks per document, per
greedy run and for the codec timings.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from thunderserve.quality.corpus import CorpusConfig, documents
from thunderserve.quality.gate import GATE, LEVELS, STORAGE_YARDSTICKS
from thunderserve.quality.greedy import ALL_PROMPTS, agreement, greedy_tokens, prompt_ids
from thunderserve.quality.perplexity import STORAGE_DTYPES, corpus_quality
from thunderserve.runtime.engine.base import KVCache
from thunderserve.runtime.kv.quantize import dequantize_kv, payload_nbytes, quantize_kv
from thunderserve.runtime.kv.schemes import LEVEL_SCHEMES, KvScheme

RATIO_TOKENS = (512, 2048)
ALL_LEVELS: tuple[str, ...] = (*LEVELS, *STORAGE_YARDSTICKS)


def _ratio(kv: KVCache, level: str | KvScheme, tokens: int) -> float:
    """fp16 bytes over payload bytes for the first `tokens` tokens of `kv`, held in fp16."""
    if isinstance(level, str) and level in STORAGE_DTYPES:
        return 1.0
    half = KVCache(keys=kv.keys[:, :, :tokens].to(torch.float16), values=kv.values[:, :, :tokens].to(torch.float16),
                   first_layer=kv.first_layer)
    return 2 * half.keys.numel() * 2 / payload_nbytes(quantize_kv(half, level))


def _codec_speed(kv: KVCache, level: str, repeats: int) -> tuple[float, float]:
    """(quantize GB/s, dequantize GB/s) on one cache, in bytes of the uncompressed cache."""
    raw = 2 * kv.keys.numel() * kv.keys.element_size()
    if level in STORAGE_DTYPES:
        dt = STORAGE_DTYPES[level]

        def enc() -> Any:
            return kv.keys.to(dt), kv.values.to(dt)

        def dec(x: Any) -> Any:
            return x[0].to(kv.keys.dtype), x[1].to(kv.values.dtype)
    else:
        def enc() -> Any:
            return quantize_kv(kv, level)

        def dec(x: Any) -> Any:
            return dequantize_kv(x)
    dec(enc())  # warm-up, untimed
    enc_s, dec_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = enc()
        t1 = time.perf_counter()
        dec(x)
        enc_s.append(t1 - t0)
        dec_s.append(time.perf_counter() - t1)
    return raw / statistics.median(enc_s) / 1e9, raw / statistics.median(dec_s) / 1e9


def bench_kv(model: str = "smollm2", *, levels: Sequence[str] = ALL_LEVELS, corpus: CorpusConfig = CorpusConfig(),
             prompts: Sequence[str] = ALL_PROMPTS, num_tokens: int = 64, repeats: int = 3,
             ratio_tokens: Sequence[int] = RATIO_TOKENS, schemes: Sequence[KvScheme] = (), engine: Any = None,
             progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """The gate's measurements (see the module docstring); `engine` defaults to `load_engine(model)`.

    `schemes` (candidates from `schemes.SCHEMES`) are scored on the same documents in the same pass, for the
    bytes-vs-quality trade-off: under "schemes", the corpus metrics, passes_gate and compression_ratio_vs_fp16
    of each (no greedy run or codec timing: they are not levels the runtime sends)."""
    unknown = [lv for lv in levels if lv not in ALL_LEVELS]
    if unknown:
        raise ValueError(f"unknown level {unknown[0]!r} (known: {', '.join(ALL_LEVELS)})")
    if num_tokens < 1 or not ratio_tokens or min(ratio_tokens) < 1:
        raise ValueError("num_tokens and every ratio_tokens must be at least 1")
    if engine is None:
        from thunderserve.runtime.engine import load_engine

        engine = load_engine(model)
    total = corpus.num_docs + 1 + len(levels) + 1
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    quality = corpus_quality(engine, [*levels, *schemes], corpus, progress=tick)
    ids = prompt_ids(engine, prompts)
    with torch.no_grad():
        prefilled = engine.prefill([list(p) for p in ids])  # one exact prefill; each level round-trips its KV
    ref = greedy_tokens(engine, ids, num_tokens, None, prefilled)
    tick("greedy reference")
    greedy = {}
    for lv in levels:
        greedy[lv] = agreement(ref, greedy_tokens(engine, ids, num_tokens, lv, prefilled))
        tick(f"greedy {lv}")
    doc = documents(engine.encode, corpus)[0]
    prompt = [*doc.prompt, *doc.continuation][:max(ratio_tokens)]
    with torch.no_grad():
        long_kv = engine.prefill([prompt])[0].kv
    out_levels: dict[str, Any] = {}
    for lv in levels:
        q = quality[lv]
        q_gbps, dq_gbps = _codec_speed(long_kv, lv, repeats)
        out_levels[lv] = {"passes_gate": GATE.passes(q["perplexity_delta_rel"], q["teacher_forced_agreement"]),
                          **q, **greedy[lv],
                          "compression_ratio_vs_fp16": {str(t): _ratio(long_kv, lv, t) for t in ratio_tokens
                                                        if t <= long_kv.num_tokens},
                          "quantize_gbps": q_gbps, "dequantize_gbps": dq_gbps}
    tick("codec speed")
    candidates = {s.name: {"passes_gate": GATE.passes(quality[s.name]["perplexity_delta_rel"],
                                                      quality[s.name]["teacher_forced_agreement"]),
                           **quality[s.name], "scheme": vars(s),
                           "compression_ratio_vs_fp16": {str(t): _ratio(long_kv, s, t) for t in ratio_tokens
                                                         if t <= long_kv.num_tokens}} for s in schemes}
    level_schemes = {lv: vars(LEVEL_SCHEMES[lv]) for lv in levels if lv in LEVEL_SCHEMES}
    config = {"model": model, "kv_dtype": str(long_kv.keys.dtype).removeprefix("torch."),
              "kv_shape_per_token": [*long_kv.keys.shape[:2], long_kv.keys.shape[3]], "corpus": quality["corpus"],
              "greedy": {"num_prompts": len(ids), "num_tokens": num_tokens}, "schemes": level_schemes,
              "codec_repeats": repeats, "torch_threads": torch.get_num_threads()}
    out = {"gate": {**GATE.as_dict(), "description": GATE.describe()}, "config": config, "levels": out_levels}
    if schemes:
        out["schemes"] = candidates
    return out


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a `bench_kv` result, one row per level, with the gate printed above it."""
    cfg, c = result["config"], result["config"]["corpus"]
    lines = [result["gate"]["description"],
             f"model={cfg['model']} kv dtype={cfg['kv_dtype']}; corpus {c['num_docs']} documents x "
             f"({c['prompt_tokens']} prompt + {c['continuation_tokens']} continuation) = {c['total_tokens']} tokens, "
             f"{c['scored_tokens']} scored, reference perplexity {c['reference_perplexity']:.4f}; greedy "
             f"{cfg['greedy']['num_prompts']} chat prompts x {cfg['greedy']['num_tokens']} tokens",
             f"{'level':<14}{'gate':<6}{'ppl':>9}{'d ppl %':>9}{'forced':>8}{'KL':>9}{'free-run':>10}"
             f"{'diverged':>9}{'x fewer @512':>13}{'@2048':>7}{'quant GB/s':>11}{'dequant GB/s':>13}"]
    for name, r in result["levels"].items():
        ratios = r["compression_ratio_vs_fp16"]
        lines.append(f"{name:<14}{'pass' if r['passes_gate'] else 'FAIL':<6}{r['perplexity']:>9.4f}"
                     f"{100 * r['perplexity_delta_rel']:>+9.3f}{r['teacher_forced_agreement']:>8.4f}"
                     f"{r['kl_mean']:>9.5f}{r['free_running_agreement']:>10.3f}"
                     f"{r['prompts_diverged']:>6}/{len(r['first_divergence']):<2}"
                     f"{ratios.get('512', float('nan')):>13.2f}{ratios.get('2048', float('nan')):>7.2f}"
                     f"{r['quantize_gbps']:>11.2f}{r['dequantize_gbps']:>13.2f}")
    return "\n".join(lines)
