"""Tokenizer access for the engine: a thin, lazily loaded wrapper over the HuggingFace tokenizer in a model dir.

Lazy because only the stages that see text need it and importing transformers costs about a second; pipeline
middle stages and TP peers never pay it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


class TextCodec:
    """encode / decode / chat template of the tokenizer saved in `path` (loaded on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tok: Any = None
        self._lock = threading.Lock()

    @staticmethod
    def available(path: Path) -> bool:
        return any((path / f).is_file() for f in TOKENIZER_FILES)

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer object."""
        with self._lock:
            if self._tok is None:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(str(self.path))
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids, with the special tokens the tokenizer itself adds (as `tokenizer.encode`)."""
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids for a chat, ending with the assistant generation prompt."""
        out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(i) for i in out]
