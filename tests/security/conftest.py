"""Security tests: hostile and unlucky inputs (async tests on asyncio via anyio, like tests/runtime)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "runtime"))  # runtime_builders


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
