"""The `thunderserve` command line: thin wrappers over library functions.

Each command group lives in its own module with a `register(app)` function; user errors
(`ThunderServeError`) print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from thunderserve.errors import ThunderServeError

app = typer.Typer(
    name="thunderserve",
    help="Plan, simulate and serve LLMs on heterogeneous cloud GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Plan, simulate and serve LLMs on heterogeneous cloud GPUs."""


# Modules that define commands; each exposes register(app).
COMMAND_MODULES: list[str] = ["calib_cmds", "serve_cmds", "sim_cmds", "resched_cmds", "plan_cmds", "demo_cmd",
                              "bench_kv_cmds"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"thunderserve.cli.{_name}").register(app)


def main() -> None:
    """Console entry point."""
    try:
        app()
    except ThunderServeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)


@app.command()
def version() -> None:
    """Print the ThunderServe version."""
    from importlib.metadata import version as _v

    typer.echo(_v("thunderserve"))
