"""Rich and Markdown tables of a comparison document (the `compare --json` shape)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key, header, format)
    ("cluster", "cluster", "{}"),
    ("cost_per_hour", "$/h", "{:.2f}"),
    ("max_rate_at_slo", "max rate @SLO (req/s)", "{:.2f}"),
    ("throughput_tokens_s", "goodput (tok/s)", "{:.0f}"),
    ("slo_attainment", "attainment @common", "{:.1%}"),
    ("latency_deadline_scale", "deadline (SLO scale)", "{:.2f}"),
    ("p99_ttft_s", "p99 TTFT (s)", "{:.2f}"),
    ("p99_tpot_s", "p99 TPOT (s)", "{:.3f}"),
)


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def rows(doc: dict[str, Any]) -> list[list[str]]:
    """One row per system: name then the COLUMNS cells."""
    return [[name] + [cell(sys.get(k), f) for k, _, f in COLUMNS] for name, sys in doc["systems"].items()]


def comparison_rate(doc: dict[str, Any]) -> float | None:
    for sys in doc["systems"].values():
        return sys.get("comparison_rate_rps")
    return None


def comparison_table(doc: dict[str, Any]) -> Table:
    rate = comparison_rate(doc)
    title = (f"{doc['model']} on {doc['cluster']} (${doc['cost_per_hour']:.2f}/h), workload {doc['workload']}"
             + (f"; common rate {rate:.2f} req/s" if rate else ""))
    table = Table(title=title)
    table.add_column("system")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for row in rows(doc):
        table.add_row(*row)
    return table


def markdown_table(doc: dict[str, Any]) -> str:
    head = ["system"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(doc)]
    return "\n".join(lines)
