"""Two-panel figure: SLO attainment vs arrival rate, and vs SLO scale at the common rate (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_comparison(doc: dict[str, Any], path: Path | str) -> Path:
    """Draw the comparison document's curves into `path` (PNG/SVG/PDF by suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    fig, (ax_rate, ax_scale, ax_deadline) = plt.subplots(1, 3, figsize=(18, 4.8),
                                                         gridspec_kw={"width_ratios": [1.2, 1.2, 0.8]})
    target = None
    rate = None
    for name, sys in doc["systems"].items():
        style = "-" if "@" not in name else "--"
        curve = sys.get("attainment_vs_rate") or []
        if curve:
            ax_rate.plot([p[0] for p in curve], [100 * (p[1] or 0) for p in curve], style, marker="o", label=name)
        scale = sys.get("attainment_vs_slo_scale") or []
        if scale:
            ax_scale.plot([p[0] for p in scale], [100 * (p[1] or 0) for p in scale], style, marker=".", label=name)
        slo = sys.get("slo") or {}
        target = slo.get("attainment_target", target)
        rate = sys.get("comparison_rate_rps", rate)
    for ax in (ax_rate, ax_scale):
        if target is not None:
            ax.axhline(100 * target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.0%}")
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    names = [n for n, v in doc["systems"].items() if v.get("latency_deadline_scale") is not None]
    values = [doc["systems"][n]["latency_deadline_scale"] for n in names]
    ax_deadline.barh(names, values, color=["tab:blue" if n.startswith("thunderserve") else "tab:grey" for n in names])
    ax_deadline.invert_yaxis()
    if values and max(values) > 20 * min(values):  # an unbatched peer sits orders of magnitude above the rest
        ax_deadline.set_xscale("log")
    ax_deadline.tick_params(axis="y", labelsize=7)
    ax_deadline.set_xlabel("tightest SLO scale met (lower is better)")
    ax_deadline.set_title(f"latency deadline at {rate:.2f} req/s" if rate else "latency deadline")
    ax_deadline.grid(alpha=0.3, axis="x")
    ax_rate.set_xlabel("arrival rate (requests/s)")
    ax_rate.set_title("SLO attainment vs rate")
    ax_scale.set_xlabel("SLO scale (x reference latency)")
    ax_scale.set_xscale("log")
    ax_scale.set_title(f"SLO attainment vs SLO scale at {rate:.2f} req/s" if rate else "SLO attainment vs SLO scale")
    fig.suptitle(f"{doc['model']} on {doc['cluster']} (${doc['cost_per_hour']:.2f}/h), workload {doc['workload']}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
