"""Security tests: hostile and unlucky inputs (async tests on asyncio via anyio, like tests/runtime)."""

import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_TESTS / "runtime"))  # runtime_builders, test_retry_admin
sys.path.insert(0, str(_TESTS / "unit" / "resched"))  # test_controller's builders


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
