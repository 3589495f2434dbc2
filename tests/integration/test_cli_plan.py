"""`thunderserve plan`, `evaluate` and `demo` in-process: JSON output, plan files, and the one-line errors
(exit code 2) for bad clusters, models, plan files and infeasible requests."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from thunderserve.cli import main
from thunderserve.plan import plan_from_dict, validate_plan
from thunderserve.spec import load_cluster, load_model
from thunderserve.spec.gpu import gpu_catalog
from thunderserve.spec.model import model_catalog

CLUSTER = """
name: mini
nodes:
  - {name: a, gpu: L40S, count: 2, zone: z1}
  - {name: b, gpu: A40, count: 2, zone: z1}
network:
  default_gbps: 25
"""
FAST = ["--model", "llama-2-7b", "--time-limit", "3"]


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["thunderserve", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_plan_prints_valid_plan_json_and_writes_the_file(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = write(tmp_path, "mini.yaml", CLUSTER)
    out_file = tmp_path / "plan.json"
    code, out, err = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, "-o", str(out_file), "--json")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    plan = plan_from_dict(doc)
    validate_plan(plan, load_cluster(cluster), load_model("llama-2-7b"))
    assert json.loads(out_file.read_text()) == doc
    est = doc["estimate"]
    for key in ("max_rate_at_slo", "slo_attainment", "rate_rps", "cost_per_hour", "ttft_p90_s", "tpot_mean_s"):
        assert key in est
    assert est["max_rate_at_slo"] > 0
    assert "estimated max rate at SLO" in err  # the human summary goes to stderr with --json

    code, out, _ = run(monkeypatch, capsys, "evaluate", "--cluster", cluster, "--model", "llama-2-7b",
                       "--plan", str(out_file), "--json")
    assert code == 0
    scored = json.loads(out)
    assert scored["feasible"] is True
    assert scored["max_rate_at_slo"] == est["max_rate_at_slo"]
    assert scored["cost_per_hour"] == est["cost_per_hour"]


def test_plan_summary_is_readable(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = write(tmp_path, "mini.yaml", CLUSTER)
    code, out, _ = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, "--rate", "2")
    assert code == 0
    assert "TP" in out and "L40S" in out and "$/hour" in out and "at 2.00 req/s" in out


def test_evaluate_many_plans_one_result_per_line(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = write(tmp_path, "mini.yaml", CLUSTER)
    good = {"format": "thunderserve.plan/v1", "model": "llama-2-7b", "cluster": "mini",
            "groups": [{"id": "c0", "phase": "colocated", "stages": [{"gpus": ["a:0"], "layers": [0, 32]}]}]}
    unknown_gpu = json.loads(json.dumps(good))
    unknown_gpu["groups"][0]["stages"][0]["gpus"] = ["zz:0"]
    lines = [json.dumps(good), "{not json", json.dumps(unknown_gpu), json.dumps({**good, "model": "llama-30b"})]
    plans = write(tmp_path, "plans.jsonl", "\n".join(lines) + "\n")
    code, out, _ = run(monkeypatch, capsys, "evaluate", "--cluster", cluster, "--model", "llama-2-7b",
                       "--plans", plans, "--json")
    assert code == 0
    results = [json.loads(x) for x in out.splitlines()]
    assert len(results) == 4
    assert results[0]["feasible"] is True and results[0]["max_rate_at_slo"] > 0
    assert results[1] == {"feasible": False, "reason": f"{plans}:2: malformed JSON: Expecting property name "
                                                       f"enclosed in double quotes"}
    assert results[2] == {"feasible": False, "reason": f"{plans}:3: groups.c0.stages.0.gpus: GPU 'zz:0' is not "
                                                       f"in cluster mini"}
    assert results[3] == {"feasible": False, "reason": f"{plans}:4: model: plan is for 'llama-30b', not "
                                                       f"'llama-2-7b'"}


KNOWN_GPUS = ", ".join(g.name for g in gpu_catalog().values())
KNOWN_MODELS = ", ".join(model_catalog())


@pytest.mark.parametrize("name,yaml_text,extra,expected", [
    ("unknown-gpu.yaml", "name: c\nnodes:\n  - {name: a, gpu: FOO, count: 2}\n", [],
     "error: {path}: nodes.0.gpu: unknown GPU type 'FOO' (known: " + KNOWN_GPUS + ")"),
    ("malformed.yaml", "name: c\nnodes:\n  - {name: a, gpu: A40, count: 2\n", [],
     "error: {path}: malformed YAML at line 4: expected ',' or '}}', but got '<stream end>'"),
    ("negative.yaml", "name: c\nnodes:\n  - {name: a, gpu: A40, count: 2, zone: z}\nnetwork:\n  zones:\n"
                      "    - {between: [z, z], gbps: -5}\n", [],
     "error: {path}: network.zones.0.gbps: Input should be greater than or equal to 0"),
    ("duplicate.yaml", "name: c\nnodes:\n  - {name: a, gpu: A40, count: 2}\n  - {name: a, gpu: A40, count: 2}\n", [],
     "error: {path}: (top level): duplicate node name 'a' (nodes.1.name)"),
    ("small.yaml", "name: small\nnodes:\n  - {name: a, gpu: RTX-3090, count: 1}\n", ["--model", "llama-30b"],
     "error: model llama-30b (65.1 GB of weights) cannot fit on cluster small (1 GPU, 21.6 GB usable) with at "
     "most the allowed pipeline stages and room for KV cache"),
    ("ok.yaml", CLUSTER, ["--model", "nope"],
     "error: model: unknown model 'nope' (catalog: " + KNOWN_MODELS + "; or give a config.json path)"),
    ("ok.yaml", CLUSTER, ["--model", "llama-2-7b", "--kv-compression", "int3"],
     "error: --kv-compression: unknown compression 'int3' (known: auto, none, int8, int4)"),
    ("ok.yaml", CLUSTER, ["--model", "llama-2-7b", "--rate", "-1"], "error: --rate: must be positive, got -1.0"),
])
def test_plan_errors_are_one_line_with_exit_code_2(monkeypatch, capsys, tmp_path, name, yaml_text, extra,  # type: ignore[no-untyped-def]
                                                   expected) -> None:
    path = write(tmp_path, name, yaml_text)
    code, out, err = run(monkeypatch, capsys, "plan", "--cluster", path, "--time-limit", "2", *extra)
    assert code == 2
    assert out == ""
    assert err == expected.format(path=path) + "\n"


@pytest.mark.parametrize("text,expected", [
    ('{"format": "thunderserve.plan/v1", "model": "llama-2-7b"', "malformed JSON at line 1: Expecting ',' delimiter"),
    ('{"format": "thunderserve.plan/v9", "model": "llama-2-7b", "cluster": "mini", "groups": []}',
     "format: unsupported plan format 'thunderserve.plan/v9' (expected one of thunderserve.plan/v1, "
     "thunderserve.plan/v2)"),
    ('{"model": "llama-2-7b", "cluster": "mini", "groups": [{"id": "c0", "phase": "colocated", '
     '"stages": [{"gpus": ["a:0"], "layers": [0, 30]}]}]}',
     "groups.c0: stages cover layers [0, 30), model llama-2-7b has 32"),
    ('{"model": "llama-2-7b", "cluster": "mini", "groups": [{"id": "p0", "phase": "prefill", '
     '"stages": [{"gpus": ["a:0"], "layers": [0, 32]}]}]}',
     "groups: prefill groups need at least one decode group"),
])
def test_bad_plan_files_name_the_file_and_field(monkeypatch, capsys, tmp_path, text, expected) -> None:  # type: ignore[no-untyped-def]
    cluster = write(tmp_path, "mini.yaml", CLUSTER)
    plan = write(tmp_path, "plan.json", text)
    code, out, err = run(monkeypatch, capsys, "evaluate", "--cluster", cluster, "--model", "llama-2-7b",
                         "--plan", plan, "--json")
    assert code == 2 and out == ""
    assert err == f"error: {plan}: {expected}\n"


def test_evaluate_needs_exactly_one_plan_source(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = write(tmp_path, "mini.yaml", CLUSTER)
    code, _, err = run(monkeypatch, capsys, "evaluate", "--cluster", cluster, "--model", "llama-2-7b")
    assert code == 2
    assert err == "error: --plan: give exactly one of --plan FILE or --plans FILE.jsonl\n"


def test_demo_plans_the_builtin_scenario(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out_dir = tmp_path / "demo"
    code, out, err = run(monkeypatch, capsys, "demo", "--time-limit", "2", "--plan-only", "--out-dir", str(out_dir),
                         "--json")
    assert code == 0, err
    doc = json.loads(out)
    plan = plan_from_dict(doc["plan"])
    assert doc["comparison"] is None and doc["out_dir"] == str(out_dir)
    assert plan.cluster == "paper-cloud-32" and plan.model == "llama-30b"
    validate_plan(plan, load_cluster("paper-cloud-32"), load_model("llama-30b"))
    assert plan.estimate["max_rate_at_slo"] > 0
    assert "plan for llama-30b on paper-cloud-32" in err
    assert plan_from_dict(json.loads((out_dir / "plan.json").read_text())) == plan


def test_demo_refuses_a_file_as_out_dir(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "taken"
    target.write_text("x")
    code, _, err = run(monkeypatch, capsys, "demo", "--out-dir", str(target))
    assert code == 2
    assert err == f"error: --out-dir: {target} exists and is not a directory\n"


@pytest.mark.slow
@pytest.mark.timeout(1500)  # seven systems planned and simulated, with curves (11 min on one core)
def test_demo_compares_with_every_baseline_and_writes_the_plot(monkeypatch, capsys, tmp_path  # type: ignore[no-untyped-def]
                                                               ) -> None:
    out_dir = tmp_path / "demo"
    code, out, err = run(monkeypatch, capsys, "demo", "--time-limit", "2", "--duration", "120",
                         "--out-dir", str(out_dir), "--json")
    assert code == 0, err
    doc = json.loads(out)
    systems = doc["comparison"]["systems"]
    names = {"thunderserve", "thunderserve-uncompressed", "thunderserve-colocated", "vllm", "distserve", "hexgen"}
    assert set(systems) == names | {f"{n}@inhouse-8xa100" for n in names}
    # the comparison reuses the plan the demo printed rather than planning ThunderServe again
    assert plan_from_dict(systems["thunderserve"]["plan"]).groups == plan_from_dict(doc["plan"]).groups
    assert all(s["max_rate_at_slo"] is not None for s in systems.values())
    assert (out_dir / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out_dir / "report.md").read_text()
    assert "compare.png" in report and "thunderserve" in report and "distserve@inhouse-8xa100" in report
    assert err.count("┏") == 2  # the plan table and the comparison table went to stderr (stdout is the JSON)


def test_plan_verify_top_rescores_by_simulation(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = write(tmp_path, "mini.yaml", CLUSTER)
    code, out, err = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, "--verify-top", "2", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["estimate"]["verified_max_rate_rps"] > 0
    assert "verified by simulation" in err and "kept" in err
    code, _, err = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, "--verify-top", "-1")
    assert code == 2 and "--verify-top" in err and "Traceback" not in err


def _gate_file(tmp_path: Path, int4_delta: float) -> str:
    levels = {"none": (0.0, 1.0), "int8": (0.001, 0.998), "int4": (int4_delta, 0.995)}
    doc = {"levels": {k: {"perplexity_delta_rel": d, "teacher_forced_agreement": a} for k, (d, a) in levels.items()}}
    return write(tmp_path, f"gate-{int4_delta}.json", json.dumps(doc))


def test_plan_never_picks_a_level_that_fails_the_gate_unless_forced(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = write(tmp_path, "mini.yaml", CLUSTER)
    failing, passing = _gate_file(tmp_path, 0.05), _gate_file(tmp_path, 0.005)
    seen = {}
    for name, extra in (("auto-failing", ["--kv-gate", failing]), ("auto-none-stored", []),
                        ("auto-passing", ["--kv-gate", passing]),
                        ("forced", ["--kv-compression", "int4", "--kv-gate", failing])):
        code, out, err = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, *extra, "--json")
        assert code == 0, err
        seen[name] = (plan_from_dict(json.loads(out)).kv_transfer, err)
    # auto: the planner ends with whichever allowed level its estimate rates highest (ties: the less compressed)
    kv, err = seen["auto-failing"]  # int4 fails its stored gate: never int4
    assert kv.compression in ("none", "int8") and kv.gate is not None and kv.gate.passes_gate
    assert not kv.gate.forced
    assert f"KV compression {kv.compression} (auto): passes the KV quality gate" in err
    kv, err = seen["auto-none-stored"]  # no results for llama-2-7b: at most the int8 fallback
    assert kv.compression in ("none", "int8") and kv.gate is not None and kv.gate.passes_gate
    kv, _ = seen["auto-passing"]
    assert kv.compression in ("none", "int8", "int4") and kv.gate is not None and kv.gate.passes_gate
    kv, err = seen["forced"]  # forcing is allowed; the plan and the output say it failed
    assert kv.compression == "int4" and kv.gate is not None and kv.gate.forced and not kv.gate.passes_gate
    assert "KV compression int4 (forced): did NOT pass the KV quality gate" in err
    code, out, err = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, "--kv-gate",
                         str(tmp_path / "nope.json"))
    assert code == 2 and err == f"error: {tmp_path / 'nope.json'}: file not found\n"


def test_plan_for_vllm_is_costed_with_uncompressed_kv(monkeypatch, capsys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """vLLM's KV connector sends caches as they are: a plan for `--engine vllm` is costed with `none`, even where
    the gate would allow int4, and a compressed level for vLLM is refused in one line naming the option."""
    cluster = write(tmp_path, "mini.yaml", CLUSTER)
    passing = _gate_file(tmp_path, 0.005)
    code, out, err = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, "--kv-gate", passing,
                         "--engine", "vllm", "--json")
    assert code == 0, err
    kv = plan_from_dict(json.loads(out)).kv_transfer
    assert kv.compression == "none" and kv.gate is not None and not kv.gate.forced
    code, _, err = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, "--engine", "vllm",
                       "--kv-compression", "int4")
    assert code == 2 and "--kv-compression" in err and "uncompressed" in err and "Traceback" not in err
    code, _, err = run(monkeypatch, capsys, "plan", "--cluster", cluster, *FAST, "--engine", "sglang")
    assert code == 2 and "--engine" in err and "Traceback" not in err
