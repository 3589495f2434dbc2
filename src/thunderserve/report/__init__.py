"""Comparison runs, tables, plots and Markdown reports of simulated systems."""

from thunderserve.report.compare import CompareConfig, finite_json, run_comparison
from thunderserve.report.markdown import write_markdown
from thunderserve.report.plot import plot_comparison
from thunderserve.report.table import comparison_table

__all__ = ["CompareConfig", "comparison_table", "finite_json", "plot_comparison", "run_comparison",
           "write_markdown"]
