"""`thunderserve profile` on the real SmolLM2 engine, then a CPU calibration from it (slow: loads the model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from thunderserve.cli import main
from thunderserve.costmodel.calibration import load_calibration
from thunderserve.profiling.schema import load_profile

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("thunderserve.runtime.engine.loader") is None,
                       reason="the runtime engine is not in this build"),
]


def _cli(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["thunderserve", *args])
    try:
        main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_profile_smollm2_and_fit_a_cpu_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    prof_path, calib_path = tmp_path / "profile.json", tmp_path / "cpu.json"
    assert _cli(monkeypatch, "profile", "--model", "smollm2", "--threads", "1", "--prefill-batches", "1,2",
                "--prompt-tokens", "8,32", "--decode-batches", "1,4", "--context-tokens", "16,48",
                "--kv-tokens", "512", "--repeats", "2", "-o", str(prof_path), "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    prof = load_profile(prof_path)
    assert printed["device"]["gpu_type"] == "CPU" and prof.device.threads == 1
    assert prof.model.name == "smollm2-135m" and prof.model.num_layers == 30
    assert len(prof.measurements) == 8 and all(m.latency_s > 0 for m in prof.measurements)
    assert {k.method for k in prof.kv} == {"none", "int8", "int4"}
    int4 = next(k for k in prof.kv if k.method == "int4")
    assert int4.encoded_bytes < int4.raw_bytes / 4
    assert _cli(monkeypatch, "calibrate", "--profile", str(prof_path), "-o", str(calib_path), "--json") == 0
    cpu = load_calibration(calib_path).gpu("CPU")
    assert cpu is not None and cpu.errors.num_points == 8
    assert cpu.spec.fp16_tflops == pytest.approx(prof.device.peak_tflops)
