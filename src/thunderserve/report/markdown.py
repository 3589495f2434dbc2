"""Markdown report of a comparison: the table, the protocol in one paragraph, and the plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thunderserve.report.table import cell, comparison_rate, markdown_table


def render_markdown(doc: dict[str, Any], plot_path: Path | str | None = None) -> str:
    rate = comparison_rate(doc)
    ts = doc["systems"].get("thunderserve")
    lines = [f"# ThunderServe comparison: {doc['model']} on {doc['cluster']}", "",
             f"Workload `{doc['workload']}`, cluster cost ${doc['cost_per_hour']:.2f}/hour.", "",
             markdown_table(doc), ""]
    if ts is not None:
        main = {k: v for k, v in doc["systems"].items() if "@" not in k and k != "thunderserve"}
        best = max(main.items(), key=lambda kv: kv[1].get("max_rate_at_slo") or 0.0, default=None)
        if best is not None and (best[1].get("max_rate_at_slo") or 0) > 0:
            ratio = (ts.get("max_rate_at_slo") or 0.0) / best[1]["max_rate_at_slo"]
            lines += [f"ThunderServe sustains **{ratio:.2f}x** the rate of the best other system ({best[0]}) at the "
                      "SLO.", ""]
        vs = (doc.get("summary") or {}).get("vs") or {}
        if vs:
            lines += ["| ThunderServe vs | max rate ratio | latency deadline ratio |", "|---|---:|---:|"]
            lines += [f"| {n} | {cell(r['max_rate_ratio'], '{:.2f}x')} | {cell(r['deadline_ratio'], '{:.2f}x')} |"
                      for n, r in vs.items()]
            lines += ["", "(deadline ratio: the other system's tightest SLO scale met at the common rate over ours; "
                      "> 1: ours meets a tighter deadline)", ""]
    configs = [(n, s["config"]) for n, s in doc["systems"].items() if "config" in s]
    if configs:
        lines += ["What each system was given and ran:", "", "| system | shapes | dispatch | KV | scheduler | groups |",
                  "|---|---|---|---|---|---|"]
        for n, c in configs:
            groups = "; ".join(f"{k} x{v}" for k, v in (c.get("groups") or {}).items())
            lines.append(f"| {n} | {c.get('shapes', '')} | {c.get('dispatch', '')} | "
                         f"{c.get('plan_kv_compression', c.get('kv_compression', ''))} | {c.get('scheduler', '')} | "
                         f"{groups} |")
        lines.append("")
    lines += [
        "Protocol: each plan is simulated with Poisson arrivals at trace-sampled lengths; *max rate @SLO* is the",
        "largest rate whose SLO attainment meets the target (bisection); goodput is measured at that rate;",
        "attainment, p99 latencies and the deadline (smallest SLO scale meeting the target) are measured at the",
        f"common rate {rate:.2f} req/s (the best published peer's max rate)." if rate else "common rate.",
        "",
    ]
    if plot_path is not None:
        lines += [f"![SLO attainment vs rate and vs SLO scale]({plot_path})", ""]
    return "\n".join(lines)


def write_markdown(doc: dict[str, Any], path: Path | str, plot_path: Path | str | None = None) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_markdown(doc, plot_path))
    return out
