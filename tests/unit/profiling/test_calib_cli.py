"""`thunderserve calibrate` / `fidelity`: JSON contract, plot, and exit code 2 with one line for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from thunderserve.cli import main
from thunderserve.cli.calib_cmds import calibrated_cluster, load_calibration_option
from thunderserve.costmodel.calibration import default_calibration, load_calibration
from thunderserve.profiling.vidur import packaged_profiles_dir
from thunderserve.spec import load_cluster


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["thunderserve", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_calibrate_then_fidelity_on_the_unseen_h100(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    calib = tmp_path / "calibration.json"
    code, out, _ = run_cli(monkeypatch, capsys, "calibrate", "--profiles", str(packaged_profiles_dir()),
                           "--gpus", "a100,a40", "-o", str(calib), "--json")
    assert code == 0
    printed = json.loads(out)
    assert printed["shared"]["fitted_on"] == ["A100-80GB", "A40"]
    assert load_calibration(calib).model_dump(mode="json") == printed
    plot = tmp_path / "fidelity.png"
    code, out, _ = run_cli(monkeypatch, capsys, "fidelity", "--calibration", str(calib), "--profiles",
                           str(packaged_profiles_dir()), "--plot", str(plot), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["median_relative_error"] < 0.10 and report["p90_relative_error"] < 0.30
    assert report["by_gpu"]["H100-SXM"]["basis"] == "shared"
    assert report["by_gpu"]["H100-SXM"]["median_relative_error"] < 0.15
    assert "A100-80GB/llama-2-70b" in report["by_gpu_model"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_fidelity_defaults_to_the_builtin_calibration_and_profiles(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(monkeypatch, capsys, "fidelity", "--gpus", "h100", "--json", "--points")
    assert code == 0
    report = json.loads(out)
    assert list(report["by_gpu"]) == ["H100-SXM"]
    assert report["calibration"].startswith("built-in")
    assert len(report["points"]) == report["num_points"] == 12432
    p = report["points"][0]
    assert set(p) == {"gpu", "model", "op", "num_tokens", "tp", "measured_us", "predicted_us"}


@pytest.mark.parametrize("content", ["", "not json", "[1, 2]", '{"format": "thunderserve-calibration/1"}'])
def test_bad_profile_json_exits_2_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str], content: str) -> None:
    bad = tmp_path / "profile.json"
    bad.write_text(content)
    code, out, err = run_cli(monkeypatch, capsys, "calibrate", "--profile", str(bad), "-o", str(tmp_path / "c.json"))
    assert code == 2 and out == ""
    assert err.startswith(f"error: {bad}: ") and err.count("\n") == 1


def test_bad_csv_exits_2_naming_file_and_column(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    src = packaged_profiles_dir() / "a40" / "meta-llama" / "Llama-2-7b-hf" / "mlp.csv"
    dst = tmp_path / "a40" / "meta-llama" / "Llama-2-7b-hf" / "mlp.csv"
    dst.parent.mkdir(parents=True)
    lines = src.read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("time_stats.mlp_down_proj.median")
    cells = lines[5].split(",")
    cells[col] = "NaN"
    lines[5] = ",".join(cells)
    dst.write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--profiles", str(tmp_path), "-o",
                           str(tmp_path / "c.json"))
    assert code == 2
    assert err == f"error: {dst}: time_stats.mlp_down_proj.median: row 6: not a finite number ('NaN')\n"
    assert not (tmp_path / "c.json").exists()


def test_calibrate_needs_some_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "-o", str(tmp_path / "c.json"))
    assert code == 2 and "give --profiles DIR" in err
    code, _, err = run_cli(monkeypatch, capsys, "fidelity", "--calibration", str(tmp_path / "none.json"))
    assert code == 2 and err == f"error: {tmp_path / 'none.json'}: file not found\n"


def test_calibration_option_helpers() -> None:
    assert load_calibration_option(None) == default_calibration()
    cluster = load_cluster_any()
    assert calibrated_cluster(cluster, None) is cluster


def load_cluster_any():  # type: ignore[no-untyped-def]
    from thunderserve.spec.cluster import builtin_clusters

    return load_cluster(builtin_clusters()[0])


def _synthetic_profile(tmp_path: Path) -> Path:
    """A profile whose latencies follow the cost model with known CPU factors (so the fit must recover them)."""

    from thunderserve.costmodel.fit import PassKind, StageSample, predict_stage_s
    from thunderserve.profiling.schema import DeviceInfo, EngineProfile, Measurement, dump_profile
    from thunderserve.spec import load_model

    model = load_model("smollm2-135m").model_copy(update={"dtype_bytes": 4})
    device = DeviceInfo(kind="cpu", name="Test CPU", gpu_type="CPU", threads=2, torch_version="x", dtype="float32",
                        peak_tflops=0.25, memory_bandwidth_gbs=45.0, memory_gb=16.0)
    truth = EngineProfile(device=device, model=model, engine="synthetic", warmup=0, repeats=1,
                          measurements=(Measurement(phase=PassKind.DECODE, batch_size=1, tokens=1, latency_s=1.0),)
                          ).device_spec().model_copy(update={"compute_efficiency": 0.4, "memory_efficiency": 0.5,
                                                             "compute_saturation_tokens": 2.0,
                                                             "layer_overhead_us": 300.0})
    shapes = [StageSample(PassKind.PREFILL, b, n, 1.0) for b in (1, 2, 4) for n in (16, 64, 256)]
    shapes += [StageSample(PassKind.DECODE, b, c, 1.0) for b in (1, 4, 16, 32) for c in (64, 256)]
    times = predict_stage_s(model, truth, shapes)
    ms = tuple(Measurement(phase=s.phase, batch_size=s.batch_size, tokens=s.tokens, latency_s=float(t))
               for s, t in zip(shapes, times, strict=True))
    prof = EngineProfile(device=device, model=model, engine="synthetic", warmup=0, repeats=1, measurements=ms)
    path = tmp_path / "profile.json"
    path.write_text(dump_profile(prof))
    return path


def test_calibrate_a_cpu_pseudo_gpu_from_an_engine_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    prof = _synthetic_profile(tmp_path)
    calib_path = tmp_path / "cpu.json"
    code, out, _ = run_cli(monkeypatch, capsys, "calibrate", "--profile", str(prof), "-o", str(calib_path), "--json")
    assert code == 0
    calib = load_calibration(calib_path)
    assert calib.shared is None
    cpu = calib.gpu("CPU")
    assert cpu is not None and cpu.source == "engine-profile"
    assert cpu.spec.fp16_tflops == 0.25 and cpu.spec.memory_bandwidth_gbs == 45.0
    assert cpu.spec.compute_efficiency == pytest.approx(0.4, rel=0.02)
    assert cpu.spec.layer_overhead_us == pytest.approx(300.0, rel=0.02)
    code, out, _ = run_cli(monkeypatch, capsys, "fidelity", "--calibration", str(calib_path), "--profile", str(prof),
                           "--json")
    assert code == 0
    report = json.loads(out)
    assert report["median_relative_error"] < 0.01
    engine = report["engine_profiles"][str(prof)]
    assert engine["basis"] == "fitted" and set(engine["by_phase"]) == {"prefill", "decode"}
    assert len(engine["points"]) == 17
