"""Report rendering from a comparison document: table rows, Markdown, and the two-panel plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from thunderserve.plan import Group, Phase, Plan, Routing, Stage
from thunderserve.report import comparison_table, finite_json, plot_comparison, write_markdown
from thunderserve.report.compare import rate_hint
from thunderserve.report.table import markdown_table, rows


def system(rate: float, attain: float, cluster: str = "c") -> dict[str, Any]:
    return {"cluster": cluster, "cost_per_hour": 13.5, "max_rate_at_slo": rate, "throughput_tokens_s": 100 * rate,
            "slo_attainment": attain, "latency_deadline_scale": 4.2, "p99_ttft_s": 1.5, "p99_tpot_s": None,
            "comparison_rate_rps": 2.0, "slo": {"attainment_target": 0.9},
            "attainment_vs_rate": [[1.0, 1.0], [2.0, attain], [3.0, 0.2]],
            "attainment_vs_slo_scale": [[1.0, 0.1], [5.0, attain], [10.0, 1.0]], "plan": {}}


DOC = {"cluster": "c", "model": "m", "workload": "w", "cost_per_hour": 13.5,
       "systems": {"thunderserve": system(3.0, 0.97), "vllm": system(2.0, 0.9),
                   "vllm@inhouse": system(1.0, 0.3, "inhouse")}}


def test_rows_format_values_and_missing_ones() -> None:
    got = rows(DOC)
    assert got[0][:4] == ["thunderserve", "c", "13.50", "3.00"]
    assert got[0][5] == "97.0%" and got[0][-1] == "-"
    assert "| vllm@inhouse | inhouse |" in markdown_table(DOC)
    assert comparison_table(DOC).row_count == 3


def test_markdown_report_states_the_ratio_and_links_the_plot(tmp_path: Path) -> None:
    text = write_markdown(DOC, tmp_path / "r.md", "plot.png").read_text()
    assert "**1.50x** the rate of the best other system (vllm)" in text
    assert "![SLO attainment vs rate and vs SLO scale](plot.png)" in text
    assert "common rate 2.00 req/s" in text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    out = plot_comparison(DOC, tmp_path / "sub" / "p.png")
    data = out.read_bytes()
    assert data[:4] == b"\x89PNG" and len(data) > 20_000


def test_finite_json_and_rate_hint() -> None:
    assert finite_json({"a": [math.inf, 1.0, math.nan]}) == {"a": [None, 1.0, None]}
    g = Group(id="c0", phase=Phase.COLOCATED, stages=(Stage(gpus=("a:0",), layers=(0, 2)),))
    plan = Plan(model="toy", cluster="t", groups=(g,), routing=Routing(entry={"c0": 1.0}),
                estimate={"rate_hint_rps": 3.5})
    assert rate_hint(plan) == 3.5
    assert rate_hint(plan.model_copy(update={"estimate": {}})) is None
