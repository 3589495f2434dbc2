"""Predicted-vs-measured scatter (log-log, y = x reference, one colour per GPU type)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from thunderserve.errors import SpecError
from thunderserve.profiling.fidelity import Fidelity

_BASIS = {"fitted": "own fit", "shared": "not fitted: datasheet + shared model", "catalog": "catalog factors"}


def plot_fidelity(fid: Fidelity | None, path: Path, *, title: str | None = None,
                  engine: tuple[np.ndarray, np.ndarray] | None = None, engine_label: str = "local engine") -> None:
    """Write a PNG: measured (x) vs predicted (y) latency in microseconds, coloured by GPU type.

    `engine` optionally adds (measured_s, predicted_s) of whole-model passes from an engine profile.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    lo, hi = np.inf, 0.0
    if fid is not None:
        s = fid.samples
        for i, name in enumerate(s.gpus()):
            mask = s.gpu == name
            x, y = s.measured_s[mask] * 1e6, fid.predicted_s[mask] * 1e6
            err = float(np.median(np.abs(y / x - 1)))
            ax.scatter(x, y, s=4, alpha=0.35, color=f"C{i}", edgecolors="none",
                       label=f"{name} ({_BASIS.get(fid.basis[name], fid.basis[name])}, median err {err:.1%})")
            lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
    if engine is not None and len(engine[0]):
        x, y = engine[0] * 1e6, engine[1] * 1e6
        err = float(np.median(np.abs(y / x - 1)))
        ax.scatter(x, y, s=14, marker="x", color="black", label=f"{engine_label} (median err {err:.1%})")
        lo, hi = min(lo, x.min(), y.min()), max(hi, x.max(), y.max())
    if not np.isfinite(lo):
        lo, hi = 1.0, 10.0
    line = np.array([lo / 1.5, hi * 1.5])
    ax.plot(line, line, color="grey", linewidth=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured latency (µs)")
    ax.set_ylabel("predicted latency (µs)")
    default = ("Cost model fidelity: GEMM latency per op and size" if fid is not None
               else "Cost model fidelity: whole-model prefill / decode passes")
    ax.set_title(title or default)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8, markerscale=3)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise SpecError(f"cannot write plot ({exc.strerror})", source=str(path)) from None
    finally:
        plt.close(fig)
