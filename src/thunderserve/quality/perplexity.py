"""Teacher-forced quality of a compressed prompt cache on the fixed corpus (`corpus`).

Per document: the prompt is prefilled once (exact KV, float32 on CPU); for each level the prompt's KV makes the
trip the decode side sees (a codec's quantize -> bytes -> dequantize, or a plain cast for the 16-bit storage
yardsticks), and the continuation is run over it in one chunked forward, scoring every continuation token from
the second on (the first is predicted by the exact prefill, the same for every level). Against the same pass
over the exact cache (`reference`):
  * perplexity: exp(mean negative log-likelihood of the scored tokens); `perplexity_delta_rel` = ppl / ppl_ref - 1;
  * teacher-forced agreement: share of scored positions whose top-1 token equals the reference's;
  * kl_mean: mean KL(reference || level) per scored token, in nats.
Work is fixed by `CorpusConfig` (documents x tokens), never by time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from thunderserve.quality.corpus import CorpusConfig, Document, documents
from thunderserve.runtime.engine.base import KVCache
from thunderserve.runtime.kv.quantize import dequantize_kv, from_bytes, quantize_kv, to_bytes
from thunderserve.runtime.kv.schemes import KvScheme

# Plain 16-bit storage of the cache (no codec): the yardsticks a lossy codec is read against.
STORAGE_DTYPES: dict[str, torch.dtype] = {"bf16-storage": torch.bfloat16, "fp16-storage": torch.float16}

Level = str | KvScheme  # a compression level ("none", "int8", "int4"), a storage yardstick, or a scheme


def round_trip(kv: KVCache, level: Level) -> KVCache:
    """The cache as the decode side sees it: a codec's wire round trip, or a plain cast for a storage dtype."""
    if isinstance(level, str) and level in STORAGE_DTYPES:
        dt = STORAGE_DTYPES[level]
        return KVCache(keys=kv.keys.to(dt).to(kv.keys.dtype), values=kv.values.to(dt).to(kv.values.dtype),
                       first_layer=kv.first_layer)
    return dequantize_kv(from_bytes(to_bytes(quantize_kv(kv, level))), device=kv.keys.device)


@dataclass(frozen=True)
class ScoredDoc:
    """What one document's continuation looked like to one level."""

    nll: torch.Tensor  # [scored tokens] negative log-likelihood of each scored token (nats)
    top1: torch.Tensor  # [scored tokens] the level's top-1 token id at each scored position
    log_probs: torch.Tensor  # [scored tokens, vocab] log-softmax (kept for the reference only; else empty)


def _score(engine: Any, prompt_kv: KVCache, doc: Document, level: Level | None, keep: bool) -> ScoredDoc:
    """Run the continuation (all but its last token) over `prompt_kv` after `level`'s round trip."""
    kv = prompt_kv if level is None else round_trip(prompt_kv, level)
    kv = kv.clone()  # the engine extends it
    from thunderserve.runtime.engine.engine import StepItem

    logits = engine.forward([StepItem(token_ids=list(doc.continuation[:-1]), kv=kv)], every_token=True)[0][0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(doc.continuation[1:], dtype=torch.long)
    nll = -logp.gather(1, target[:, None])[:, 0]
    return ScoredDoc(nll=nll, top1=logp.argmax(-1), log_probs=logp if keep else logp.new_empty(0))


def _summary(ref: Sequence[ScoredDoc], got: Sequence[ScoredDoc], kl: float) -> dict[str, float]:
    nll_ref = float(torch.cat([d.nll for d in ref]).mean())
    nll = float(torch.cat([d.nll for d in got]).mean())
    same = torch.cat([a.top1 == b.top1 for a, b in zip(ref, got, strict=True)])
    return {"perplexity": math.exp(nll), "perplexity_delta_rel": math.exp(nll - nll_ref) - 1.0,
            "teacher_forced_agreement": float(same.float().mean()), "kl_mean": kl}


def corpus_quality(engine: Any, levels: Sequence[Level], config: CorpusConfig = CorpusConfig(),
                   progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Perplexity, its change, teacher-forced agreement and KL per level (keyed by level or scheme name), plus
    the reference's perplexity and the corpus facts under "corpus". `progress(what)` after each document."""
    docs = documents(engine.encode, config)
    names = [lv.name if isinstance(lv, KvScheme) else lv for lv in levels]
    ref: list[ScoredDoc] = []
    got: dict[str, list[ScoredDoc]] = {n: [] for n in names}
    kl_sum = dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for i, doc in enumerate(docs):
            prompt_kv = engine.prefill([list(doc.prompt)])[0].kv
            exact = prompt_kv.clone()
            r = _score(engine, exact, doc, None, keep=True)
            ref.append(ScoredDoc(r.nll, r.top1, r.log_probs.new_empty(0)))
            for name, lv in zip(names, levels, strict=True):
                s = _score(engine, exact, doc, lv, keep=True)
                # KL(ref || level) = sum p_ref (log p_ref - log p_level), per scored token
                kl_sum[name] += float((r.log_probs.exp() * (r.log_probs - s.log_probs)).sum())
                got[name].append(ScoredDoc(s.nll, s.top1, s.log_probs.new_empty(0)))
            progress(f"document {i + 1}/{len(docs)}")
    scored = sum(len(d.nll) for d in ref)
    out: dict[str, Any] = {name: _summary(ref, got[name], kl_sum[name] / scored) for name in names}
    out["corpus"] = {"num_docs": config.num_docs, "prompt_tokens": config.prompt_tokens,
                     "continuation_tokens": config.continuation_tokens, "total_tokens": config.total_tokens,
                     "scored_tokens": scored,
                     "reference_perplexity": math.exp(float(torch.cat([d.nll for d in ref]).mean()))}
    return out

