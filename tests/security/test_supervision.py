"""The controller never crashes its loop: losing every worker is recorded in one line, not a traceback."""

from __future__ import annotations

import asyncio
import logging

import pytest
from test_controller import PLAN, make_controller  # tests/unit/resched (on sys.path via conftest)


def test_losing_every_worker_is_recorded_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    ctl, fake, clock = make_controller()
    for g in PLAN.groups:
        fake.kill(g.id)
    clock.now_s = 1.0
    with caplog.at_level(logging.ERROR, logger="thunderserve.resched"):
        record = asyncio.run(ctl.tick())
    assert record is not None and record.path == "none" and "no group of the plan survives" in record.error
    assert ctl.target == PLAN and record.actions == ()  # kept, so returning workers can be reconciled to it
    assert all(r.exc_info is None for r in caplog.records)
    clock.now_s = 2.0
    assert asyncio.run(ctl.tick()) is None  # handled once; the loop goes on
