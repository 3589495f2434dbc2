"""Runtime tests: async tests run on asyncio through anyio's pytest plugin (`pytestmark = pytest.mark.anyio`)."""

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
