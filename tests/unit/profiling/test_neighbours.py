"""Busy neighbour processes for profiling a device as deployed: start paused, pause/resume, always reaped."""

from __future__ import annotations

from pathlib import Path

import pytest

from thunderserve.profiling.engine_profile import ProfileGrid
from thunderserve.profiling.neighbours import Neighbours
from thunderserve.profiling.run import run_profile
from thunderserve.runtime.fakes import FakeEngine

pytestmark = [pytest.mark.slow,  # spawns processes that import torch
              pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")]


def _state(pid: int) -> str:
    """The process state letter (R running, S sleeping, T stopped, ...) from /proc/<pid>/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_neighbours_start_paused_resume_pause_and_are_reaped() -> None:
    with Neighbours("fake", 2, threads=1, ready_timeout_s=120) as busy:
        pids = [p.pid for p in busy._procs]
        assert len(pids) == 2 and all(p is not None for p in pids)
        assert [_state(p) for p in pids if p is not None] == ["T", "T"]  # loaded, then stopped
        busy.set_busy(True)
        assert all(_state(p) in "RSD" for p in pids if p is not None)
        busy.set_busy(False)
        assert [_state(p) for p in pids if p is not None] == ["T", "T"]
        procs = list(busy._procs)
    assert not any(p.is_alive() for p in procs)


def test_run_profile_with_a_busy_neighbour_measures_each_shape_twice() -> None:
    from thunderserve.cli.serve_cmds import FAKE_MODEL

    grid = ProfileGrid(prefill_batch_sizes=(1,), prompt_tokens=(4, 8), decode_batch_sizes=(2,), context_tokens=(8,),
                       kv_tokens=(8,), warmup=0, repeats=1)
    steps: list[str] = []
    prof = run_profile("fake", "cpu", grid, engine=FakeEngine(), model_spec=FAKE_MODEL, peak_sizes=(32,),
                       threads=1, neighbours=1, on_step=steps.append)
    assert prof.neighbours == 1 and "1 neighbour(s) loaded" in steps
    assert [m.shape for m in prof.shared_measurements] == [m.shape for m in prof.measurements]
    assert len(prof.measurements) == 3 and all(m.latency_s > 0 for m in prof.shared_measurements)
