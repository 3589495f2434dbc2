"""The gate's fixed corpus: real English prose (the Python documentation's topic pages) cut into documents.

The text ships in the package (`data/kv_gate/corpus_pydoc_topics.txt`, copied once from Python 3.11.7's
`pydoc_data.topics`, PSF License), so every run on every Python version scores the same characters. Documents
are consecutive, non-overlapping windows of `prompt_tokens + continuation_tokens` tokens of the model's own
tokenisation: the prompt part's KV goes through a codec, the continuation is scored teacher-forced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files

CORPUS_FILE = "corpus_pydoc_topics.txt"
_HEADER_END = "-----\n"


@dataclass(frozen=True)
class CorpusConfig:
    """The work budget of a perplexity run (fixed defaults: stored gate results were measured with them)."""

    num_docs: int = 10  # documents scored
    prompt_tokens: int = 2048  # each document's prompt (its KV goes through the codec): the coding mean
    continuation_tokens: int = 128  # each document's continuation, scored teacher-forced

    def __post_init__(self) -> None:
        if self.num_docs < 1 or self.prompt_tokens < 1 or self.continuation_tokens < 2:
            raise ValueError("num_docs and prompt_tokens must be >= 1 and continuation_tokens >= 2")

    @property
    def total_tokens(self) -> int:
        return self.num_docs * (self.prompt_tokens + self.continuation_tokens)


@dataclass(frozen=True)
class Document:
    prompt: tuple[int, ...]  # token ids whose KV goes through the codec
    continuation: tuple[int, ...]  # token ids scored teacher-forced after the prompt


def corpus_text() -> str:
    """The fixed corpus (without its attribution header)."""
    raw = files("thunderserve").joinpath("data", "kv_gate", CORPUS_FILE).read_text(encoding="utf-8")
    return raw.split(_HEADER_END, 1)[1]


def documents(encode: Callable[[str], list[int]], config: CorpusConfig = CorpusConfig()) -> list[Document]:
    """The corpus tokenised by `encode`, cut into `config.num_docs` documents; ValueError when it is too short
    for the budget (about 30,000 tokens for a Llama-style tokeniser)."""
    ids = encode(corpus_text())
    size = config.prompt_tokens + config.continuation_tokens
    if len(ids) < config.num_docs * size:
        raise ValueError(f"the corpus has {len(ids)} tokens for this tokeniser, fewer than the "
                         f"{config.num_docs * size} that {config.num_docs} documents of {size} need")
    return [Document(tuple(ids[i * size: i * size + config.prompt_tokens]),
                     tuple(ids[i * size + config.prompt_tokens: (i + 1) * size])) for i in range(config.num_docs)]
