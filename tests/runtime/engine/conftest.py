"""Engine tests run offline on tiny random Llamas written by transformers into a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from engine_builders import make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, hidden 64, 4 heads / 2 kv heads, untied embeddings, 256-token context."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers (for pipeline splits), tied embeddings."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny4") / "llama", seed=3, num_layers=4, tie_word_embeddings=True)
