"""`thunderserve simulate` and `compare` end to end in-process: JSON shape, files, one-line errors."""

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
ENTRY_KEYS = {"cluster", "cost_per_hour", "max_rate_at_slo", "throughput_tokens_s", "slo_attainment",
              "latency_deadline_scale", "p99_ttft_s", "p99_tpot_s", "plan"}


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
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cluster.yaml").write_text(CLUSTER_YAML)
    (tmp_path / "plan.json").write_text(json.dumps(PLAN))
    return {"cluster": str(tmp_path / "cluster.yaml"), "plan": str(tmp_path / "plan.json")}


def test_simulate_searches_the_max_rate_and_reports_it(monkeypatch, capsys, files) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(monkeypatch, capsys, "simulate", "--cluster", files["cluster"], "--model", "llama-2-7b",
                       "--plan", files["plan"], "--duration", "60", "--warmup", "10", "--json")
    assert code == 0
    doc: dict[str, Any] = json.loads(out)
    assert ENTRY_KEYS <= doc.keys()
    assert doc["max_rate_at_slo"] > 0 and doc["rate_rps"] == doc["max_rate_at_slo"]
    assert doc["slo_attainment"] >= 0.9
    assert doc["plan"]["groups"][0]["id"] == "p0"


def test_simulate_at_a_fixed_rate_without_search(monkeypatch, capsys, files) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(monkeypatch, capsys, "simulate", "--cluster", files["cluster"], "--model", "llama-2-7b",
                       "--plan", files["plan"], "--rate", "0.5", "--duration", "60", "--no-search", "--json",
                       "--prefill-first")
    doc = json.loads(out)
    assert code == 0 and doc["max_rate_at_slo"] is None and doc["rate_rps"] == 0.5
    assert doc["colocated_policy"] == "prefill_first" and doc["num_requests"] > 0


def test_simulate_takes_vllm_scheduler_knobs(monkeypatch, capsys, files) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(monkeypatch, capsys, "simulate", "--cluster", files["cluster"], "--model", "llama-2-7b",
                       "--plan", files["plan"], "--rate", "0.5", "--duration", "60", "--no-search", "--json",
                       "--max-num-batched-tokens", "512", "--max-num-seqs", "8", "--no-enable-chunked-prefill")
    doc = json.loads(out)
    assert code == 0 and doc["colocated_policy"] == "prefill_first"
    assert doc["max_num_seqs"] == 8 and doc["chunk_token_budget"] == 512 and doc["prefill_token_budget"] == 512
    for key in ("p50_ttft_s", "p90_ttft_s", "p50_tpot_s", "p90_tpot_s", "mean_ttft_s", "mean_tpot_s"):
        assert doc[key] is not None and doc[key] >= 0, key
    assert doc["mean_ttft_s"] > 0
    assert doc["preemptions"] == 0  # light load: KV memory never runs out


def test_simulate_replays_a_trace(monkeypatch, capsys, files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rows = "\n".join(f"{i * 0.5},{300 + 10 * i},{20 + i}" for i in range(80))
    trace = tmp_path / "trace.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + rows + "\n")
    code, out, _ = run(monkeypatch, capsys, "simulate", "--cluster", files["cluster"], "--model", "llama-2-7b",
                       "--plan", files["plan"], "--trace", str(trace), "--no-search", "--warmup", "0", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["num_requests"] == 80 and doc["workload"] == "trace"
    assert doc["rate_rps"] == pytest.approx(80 / 39.5)


@pytest.mark.parametrize(("extra", "message"), [
    (["--rate", "1", "--trace", "x.csv"], "either --rate or --trace"),
    (["--rate", "-1"], "--rate: must be positive"),
    (["--no-search"], "--no-search needs --rate"),
    (["--prefill-first", "--enable-chunked-prefill"], "contradicts"),
])
def test_simulate_bad_options_are_one_line_errors(monkeypatch, capsys, files, extra, message) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(monkeypatch, capsys, "simulate", "--cluster", files["cluster"], "--model", "llama-2-7b",
                       "--plan", files["plan"], *extra)
    assert code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1


def test_simulate_rejects_a_plan_for_another_model(monkeypatch, capsys, files) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run(monkeypatch, capsys, "simulate", "--cluster", files["cluster"], "--model", "llama-3-8b",
                       "--plan", files["plan"], "--rate", "1", "--no-search")
    assert code == 2 and "model: plan is for 'llama-2-7b'" in err


def test_compare_json_shape(monkeypatch, capsys, files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = tmp_path / "cmp.md"
    code, out, _ = run(monkeypatch, capsys, "compare", "--cluster", files["cluster"], "--model", "llama-2-7b",
                       "--systems", "vllm", "--no-kv-levels", "--budget", "30", "--duration", "30", "--warmup", "5",
                       "--no-curves", "--chunked-only", "--report", str(report), "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"cluster", "model", "workload", "cost_per_hour", "slo", "common_rate_rps", "systems",
                        "summary", "kv_gate"}
    # no gate results stored for this model: auto plans ThunderServe with int8, and says so
    assert (doc["kv_gate"]["level"], doc["kv_gate"]["passes_gate"], doc["kv_gate"]["forced"]) == ("int8", True, False)
    assert list(doc["systems"]) == ["thunderserve", "vllm"]
    assert doc["systems"]["vllm"]["config"]["dispatch"] == "least_outstanding"
    assert doc["systems"]["thunderserve"]["config"]["search_budget_evaluations"] == 30
    assert set(doc["summary"]["vs"]) == {"vllm"}
    for entry in doc["systems"].values():
        assert ENTRY_KEYS | {"config"} <= entry.keys()
        assert entry["cost_per_hour"] == doc["cost_per_hour"]
        assert entry["comparison_rate_rps"] == doc["systems"]["vllm"]["max_rate_at_slo"]
    assert doc["systems"]["vllm"]["slo_attainment"] >= 0.9  # at its own max rate, the common rate here
    assert "| thunderserve |" in report.read_text()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # every system planned and simulated, curves included
def test_compare_with_plot_and_every_baseline(monkeypatch, capsys, files, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plot = tmp_path / "cmp.png"
    code, out, _ = run(monkeypatch, capsys, "compare", "--cluster", files["cluster"], "--model", "llama-2-7b",
                       "--budget", "40", "--duration", "60", "--warmup", "10", "--plot", str(plot), "--json")
    doc = json.loads(out)
    assert code == 0
    assert {"thunderserve", "thunderserve-uncompressed", "thunderserve-colocated", "vllm", "distserve",
            "hexgen"} <= set(doc["systems"])
    assert all(len(e["attainment_vs_rate"]) >= 5 for e in doc["systems"].values())
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.timeout(1200)  # every system planned and simulated, curves included
def test_compare_with_a_baseline_cluster_adds_entries(monkeypatch, capsys, files) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(monkeypatch, capsys, "compare", "--cluster", files["cluster"], "--model", "llama-2-7b",
                       "--baseline-cluster", "inhouse-8xa100", "--budget", "30", "--duration", "60",
                       "--no-curves", "--no-kv-levels", "--json")
    doc = json.loads(out)
    assert code == 0
    assert {"vllm@inhouse-8xa100", "distserve@inhouse-8xa100", "hexgen@inhouse-8xa100"} <= set(doc["systems"])
    assert doc["systems"]["distserve@inhouse-8xa100"]["cluster"] == "inhouse-8xa100"
