"""Free-running greedy agreement of a compressed prompt cache on fixed chat prompts.

Every prompt's prefill KV makes the level's round trip (`perplexity.round_trip`) before greedy decoding continues
from it; tokens are compared position by position with the run from the exact cache (EOS ignored: every prompt
decodes exactly `num_tokens` tokens). One early flip makes the rest of that prompt disagree, so this measures
what a user sees, where teacher-forced agreement (`perplexity`) measures each step alone. `first_divergence`
lists, per prompt, the first position that differs (`num_tokens` when none does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from thunderserve.quality.perplexity import Level, round_trip
from thunderserve.runtime.engine.base import DecodeInput

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
ALL_PROMPTS: tuple[str, ...] = tuple(p for ps in PROMPT_SETS.values() for p in ps)


def prompt_ids(engine: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as one chat turn in the model's template."""
    return [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]


def greedy_tokens(engine: Any, ids: Sequence[Sequence[int]], num_tokens: int, level: Level | None,
                  prefilled: Sequence[Any] | None = None) -> list[list[int]]:
    """`num_tokens` greedy tokens per prompt (one batch), decoding from the prefill KV after `level`'s round
    trip (None: the exact cache). `prefilled`: the prompts' `engine.prefill` results, shared by every level's
    run (left unchanged; default: prefilled here)."""
    with torch.no_grad():
        results = engine.prefill([list(p) for p in ids]) if prefilled is None else prefilled
        kvs = [r.kv.clone() if level is None else round_trip(r.kv, level) for r in results]
        tokens = [[int(torch.argmax(r.logits))] for r in results]
        while len(tokens[0]) < num_tokens:
            outs = engine.decode([DecodeInput(seq[-1], kv) for seq, kv in zip(tokens, kvs, strict=True)])
            for seq, o in zip(tokens, outs, strict=True):
                seq.append(int(torch.argmax(o)))
    return tokens


def agreement(ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Share of positions equal to the reference, and the first differing position per prompt."""
    same = sum(a == b for r, t in zip(ref, got, strict=True) for a, b in zip(r, t, strict=True))
    first = [next((i for i, (a, b) in enumerate(zip(r, t, strict=True)) if a != b), len(r))
             for r, t in zip(ref, got, strict=True)]
    return {"free_running_agreement": same / sum(len(r) for r in ref), "first_divergence": first,
            "prompts_diverged": sum(f < len(r) for f, r in zip(first, ref, strict=True))}
