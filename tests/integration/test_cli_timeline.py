"""`thunderserve simulate --event ...` end to end in-process: JSON document, plot file, one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from thunderserve.cli import main

CLUSTER_YAML = """
name: two-a40
nodes:
  - {name: a, gpu: A40, count: 2, zone: z1}
  - {name: b, gpu: A40, count: 2, zone: z2}
network:
  default_gbps: 10
"""
PLAN = {
    "format": "thunderserve.plan/v1", "model": "llama-2-7b", "cluster": "two-a40",
    "kv_transfer": {"compression": "int4"},
    "groups": [
        {"id": "p0", "phase": "prefill", "stages": [{"gpus": ["a:0"], "layers": [0, 32]}]},
        {"id": "d0", "phase": "decode", "stages": [{"gpus": ["a:1"], "layers": [0, 32]}]},
        {"id": "c0", "phase": "colocated", "stages": [{"gpus": ["b:0", "b:1"], "layers": [0, 32]}]},
    ],
    "routing": {"entry": {"p0": 0.5, "c0": 0.5}, "kv": {"p0": {"d0": 1.0}}},
}


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["thunderserve", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def base(tmp_path: Path) -> list[str]:
    (tmp_path / "cluster.yaml").write_text(CLUSTER_YAML)
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    return ["simulate", "--cluster", str(tmp_path / "cluster.yaml"), "--model", "llama-2-7b",
            "--plan", str(tmp_path / "plan.json"), "--duration", "120", "--warmup", "10"]


def test_events_compare_the_policies_as_json_and_plot(monkeypatch, capsys, base, tmp_path) -> None:  # type: ignore[no-untyped-def]
    png = tmp_path / "timeline.png"
    code, out, err = run(monkeypatch, capsys, *base, "--rate", "2", "--event", "60:fail:b",
                         "--event", "90:workload:coding", "--decision-time", "0.1", "--time-limit", "1",
                         "--timeline", str(png), "--json")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    assert set(doc["policies"]) == {"none", "lightweight", "full"}
    assert [e["event"] for e in doc["events"]] == ["fail:b", "workload:coding"]
    assert [w["name"] for w in doc["workloads"]] == ["conversation", "coding"]
    light = doc["policies"]["lightweight"]
    assert light["replans"] and light["replans"][0]["cause"] == "fail:b"
    assert light["replans"][0]["decision_time_s"] == 0.1
    assert doc["policies"]["full"]["replans"][0]["decision_time_s"] == 1.0  # fixed: the search's time limit
    assert any(d["kind"] == "fail" for d in doc["policies"]["none"]["detections"])
    assert all(p["unfinished"] == 0 for p in doc["policies"].values())
    assert doc["reference"]["final_window_attainment"] is not None and doc["checks"]
    assert png.stat().st_size > 10_000


def test_human_output_has_the_table_log_and_checks(monkeypatch, capsys, base) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(monkeypatch, capsys, *base, "--rate", "2", "--event", "60:fail:b",
                         "--policies", "none,lightweight", "--no-reference", "--decision-time", "0.1")
    assert code == 0, err
    assert "lightweight" in out and "event and decision log" in out and "done-when checks" in out
    assert "heartbeat timeout" in out


@pytest.mark.parametrize(("extra", "field"), [
    (["--event", "60:fail:b"], "--rate"),
    (["--rate", "2", "--event", "sixty:fail:b"], "--event"),
    (["--rate", "2", "--event", "60:fail:zz"], "--event"),
    (["--rate", "2", "--event", "600:fail:b"], "--event"),
    (["--rate", "2", "--event", "60:fail:b", "--policies", "none,magic"], "--policies"),
    (["--rate", "2", "--event", "60:fail:b", "--decision-time", "soon"], "--decision-time"),
    (["--rate", "2", "--timeline", "x.png"], "--timeline"),
])
def test_bad_timeline_options_are_one_line_errors(monkeypatch, capsys, base, extra, field) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run(monkeypatch, capsys, *base, *extra)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and field in lines[0]
