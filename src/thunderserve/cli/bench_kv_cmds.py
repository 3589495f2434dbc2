"""`thunderserve bench-kv`: the KV quality gate's measurements on a real model (`quality.bench`), as a table or
JSON. Its `--json` output is also the gate results file `plan --kv-gate` reads for models the package has none
for."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from thunderserve.cli.common import JsonOpt, console, out, print_json
from thunderserve.errors import SpecError, ThunderServeError


def bench_kv(
    model: str = typer.Option("smollm2", "--model", help="HuggingFace model directory, .gguf file, or smollm2"),
    num_tokens: int = typer.Option(64, "--num-tokens", help="Greedy tokens generated per chat prompt"),
    num_docs: int = typer.Option(10, "--num-docs", help="Corpus documents scored (the gate's budget: 10)"),
    threads: int = typer.Option(0, "--threads", help="torch intra-op threads (0: torch's default)"),
    schemes: str = typer.Option("", "--schemes", help="Also score these candidate schemes on the same documents "
                                "(comma-separated names from runtime.kv.schemes, or 'all'): the trade-off table"),
    output: Path | None = typer.Option(None, "-o", "--output", help="Also write the JSON result here "
                                       "(a gate results file for plan --kv-gate)"),
    as_json: bool = JsonOpt,
) -> None:
    """KV compression quality gate: perplexity, agreement, KL, bytes and codec speed per level (progress bar)."""
    if num_tokens < 1:
        raise SpecError("must be at least 1", field="--num-tokens")
    if num_docs < 1:
        raise SpecError("must be at least 1", field="--num-docs")
    if threads < 0:
        raise SpecError("must be 0 or more", field="--threads")
    import torch

    from thunderserve.quality.bench import bench_kv as run_bench_kv
    from thunderserve.quality.bench import format_table
    from thunderserve.quality.corpus import CorpusConfig
    from thunderserve.quality.gate import GATE
    from thunderserve.runtime.kv.schemes import LEVEL_SCHEMES, SCHEMES

    names = [n.strip() for n in schemes.split(",") if n.strip()]
    if names == ["all"]:
        names = [n for n, s in SCHEMES.items() if s not in LEVEL_SCHEMES.values()]
    unknown = [n for n in names if n not in SCHEMES]
    if unknown:
        raise SpecError(f"unknown scheme '{unknown[0]}' (known: all, {', '.join(SCHEMES)})", field="--schemes")
    if threads:
        torch.set_num_threads(threads)
    console.print(GATE.describe(), highlight=False)
    with Progress(TextColumn("bench-kv {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("loading the model", total=None)

        def tick(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        try:
            result = run_bench_kv(model=model, num_tokens=num_tokens, corpus=CorpusConfig(num_docs=num_docs),
                                  schemes=[SCHEMES[n] for n in names], progress=tick)
        except (ValueError, FileNotFoundError) as exc:
            raise ThunderServeError(f"bench-kv: {exc}") from None
    if output is not None:
        import json

        try:
            output.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as exc:
            raise SpecError(f"cannot write ({exc.strerror})", source=str(output)) from None
    if as_json:
        print_json(result)
        return
    out.print(format_table(result), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("bench-kv")(bench_kv)
