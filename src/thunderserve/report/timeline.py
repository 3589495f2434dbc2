"""Rescheduling timelines: the done-when checks, a summary table and the attainment-over-time plot.

All three read the JSON document of `sim.timeline.TimelineResult.to_dict()` (plus optional "model" and
"cluster" keys), so the CLI, the benchmark and a saved `--json` file render the same way.

Checks (thresholds are arguments; defaults are the rescheduling issue's numbers):
  * restore: after each event, the lightweight policy's per-bucket attainment is back at the target (and
    stays there until the next event or the end) within `restore_within_s` of the detection;
  * vs fresh: its final-window attainment is at least `fresh_ratio` x that of a fresh full plan for the
    final state serving the same requests;
  * steady: with no events, no policy re-plans (no flapping).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

RESTORE_WITHIN_S = 60.0
FRESH_RATIO = 0.9
POLICY_STYLE = {"none": ("tab:red", "-"), "lightweight": ("tab:blue", "-"), "full": ("tab:orange", "-"),
                "fresh": ("black", "--")}


def timeline_checks(doc: dict[str, Any], restore_within_s: float = RESTORE_WITHIN_S,
                    fresh_ratio: float = FRESH_RATIO, policy: str = "lightweight") -> list[dict[str, Any]]:
    """The done-when checks of one policy's run (each: name, measured, target, ok; ok None = not measurable)."""
    pol = doc["policies"].get(policy)
    if pol is None:
        return []
    out: list[dict[str, Any]] = []
    if not doc["events"]:
        n = sum(len(p["replans"]) for p in doc["policies"].values())
        out.append({"name": "steady load: re-plans (all policies)", "measured": n, "target": "0", "ok": n == 0})
        return out
    for rec in pol["recovery"]:
        delay = rec["restore_delay_s"]
        out.append({"name": f"{policy}: attainment target restored after {rec['event']} (s after detection)",
                    "measured": delay, "target": f"<= {restore_within_s:g}",
                    "ok": None if rec["detected_s"] is None else delay is not None and delay <= restore_within_s})
    ratio = pol.get("final_vs_fresh")
    if "reference" in doc:
        out.append({"name": f"{policy}: final-window attainment / fresh full plan's", "measured": ratio,
                    "target": f">= {fresh_ratio:g}", "ok": ratio is not None and ratio >= fresh_ratio})
    return out


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1%}" if pct else f"{v:.1f}"
    return str(v)


def timeline_table(doc: dict[str, Any]) -> Table:
    """One row per policy (and the fresh plan): attainment, detection, decision and apply times, recovery."""
    title = f"SLO attainment under events at {doc['rate_rps']:.2f} req/s ({doc['duration_s']:.0f} s of arrivals)"
    table = Table(title=title)
    for col in ("policy", "overall", "final window", "vs fresh", "re-plans", "detect (s)", "decide (s)",
                "apply (s)", "restored after (s)", "min bucket", "retried", "unfinished"):
        table.add_column(col, justify="right")
    for name, p in doc["policies"].items():
        reps = p["replans"]
        rec = p["recovery"]
        first = [next((r for r in reps if r["detected_s"] >= (e["detected_s"] or 0) and e["detected_s"] is not None),
                      None) for e in rec]  # the first re-plan answering each event
        table.add_row(
            name, _fmt(p["overall_attainment"], True), _fmt(p["final_window_attainment"], True),
            _fmt(p.get("final_vs_fresh"), True), str(len(reps)),
            ", ".join(_fmt(e["detection_delay_s"]) for e in rec) or "-",
            ", ".join("-" if r is None else f"{r['decision_time_s']:.2f}" for r in first) or "-",
            ", ".join("-" if r is None else _fmt(r["apply_time_s"]) for r in first) or "-",
            ", ".join(_fmt(e["restore_delay_s"]) if e["restored_at_s"] is not None else "never" for e in rec) or "-",
            ", ".join(_fmt(e["min_bucket_attainment"], True) for e in rec) or "-",
            str(p["retried_requests"]), str(p["unfinished"]))
    ref = doc.get("reference")
    if ref is not None:
        table.add_row("fresh plan", "-", _fmt(ref["final_window_attainment"], True), "100.0%", "-", "-", "-", "-",
                      "-", "-", "0", str(ref["unfinished"]))
    return table


def log_table(doc: dict[str, Any], policies: tuple[str, ...] = ("lightweight", "full")) -> Table:
    """What happened when, per policy (events, detections, decisions, apply steps, groups ready)."""
    table = Table(title="event and decision log")
    for col in ("time (s)", "policy", "what", "detail"):
        table.add_column(col)
    for name in policies:
        for t, kind, detail in doc["policies"].get(name, {}).get("log", []):
            table.add_row(f"{t:.1f}", name, kind, detail)
    return table


def checks_table(checks: list[dict[str, Any]]) -> Table:
    table = Table(title="done-when checks")
    for col in ("check", "measured", "target", "result"):
        table.add_column(col)
    for c in checks:
        m = c["measured"]
        shown = f"{m:.3f}" if isinstance(m, float) else _fmt(m)
        table.add_row(c["name"], shown, c["target"], {True: "pass", False: "FAIL", None: "n/a"}[c["ok"]])
    return table


def plot_timeline(doc: dict[str, Any], path: Path | str, checks: list[dict[str, Any]] | None = None) -> Path:
    """SLO attainment per arrival bucket over time, one line per policy (+ the fresh plan), events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    bucket = doc["bucket_s"]
    fig, ax = plt.subplots(figsize=(11, 5.2))
    series = {name: p["buckets"] for name, p in doc["policies"].items()}
    if "reference" in doc:
        series["fresh"] = doc["reference"]["buckets"]
    for name, rows in series.items():
        pts = [(t + bucket / 2, 100 * a) for t, a, n in rows if n and a is not None]
        if not pts:
            continue
        color, style = POLICY_STYLE.get(name, (None, "-"))
        label = "fresh full plan (final state)" if name == "fresh" else f"{name} rescheduling"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, marker=".", label=label)
        for det in doc["policies"].get(name, {}).get("replans", []):
            ax.plot([det["detected_s"]], [101], marker="v", color=color, markersize=6)
    target = doc["slo"]["attainment_target"]
    ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.0%}")
    for ev in doc["events"]:
        ax.axvline(ev["at_s"], color="black", linestyle="--", linewidth=1)
        ax.text(ev["at_s"], 50, f"{ev['event']} ", rotation=90, fontsize=8, ha="right", va="center")
    lo, hi = doc["final_window_s"]
    ax.axvspan(lo, hi, color="grey", alpha=0.08, label="final window")
    ax.set_xlabel(f"arrival time (s), {bucket:g} s buckets")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 104)
    ax.set_xlim(0, doc["duration_s"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    where = f"{doc.get('model', '')} on {doc.get('cluster', '')}".strip()
    workloads = " -> ".join(w["name"] for w in doc["workloads"])
    ax.set_title(f"SLO attainment over time: {where}, {workloads} at {doc['rate_rps']:.2f} req/s "
                 "(v = re-plan decided)", fontsize=10)
    if checks:
        text = "\n".join(f"{'PASS' if c['ok'] else ('n/a' if c['ok'] is None else 'FAIL')}: {c['name']} = "
                         f"{c['measured'] if not isinstance(c['measured'], float) else round(c['measured'], 3)}"
                         f" ({c['target']})" for c in checks)
        ax.text(0.99, 0.02, text, transform=ax.transAxes, fontsize=7, ha="right", va="bottom",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
