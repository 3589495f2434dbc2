"""The `thunderserve` command line: thin wrappers over library functions.

Each command group lives in its own module with a `register(app)` function; user errors
(`ThunderServeError`) print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from thunderserve.errors import ThunderServeError

# Where each command lives: `thunderserve plan ...` imports only plan_cmds (no torch, no server stack), so a
# command starts fast and a planning-only install (no `serve` extra) works. A command missing here is still
# found (every module is then loaded), only slower; top-level --help loads them all.
COMMANDS: dict[str, str] = {
    "plan": "plan_cmds", "evaluate": "plan_cmds", "simulate": "sim_cmds", "compare": "sim_cmds",
    "replan": "resched_cmds", "serve": "serve_cmds", "bench-serve": "serve_cmds", "bench-kv": "bench_kv_cmds",
    "calibrate": "calib_cmds", "fidelity": "calib_cmds", "profile": "calib_cmds", "demo": "demo_cmd",
}
# Modules that define commands; each exposes register(app).
COMMAND_MODULES: list[str] = ["calib_cmds", "serve_cmds", "sim_cmds", "resched_cmds", "plan_cmds", "demo_cmd",
                              "bench_kv_cmds"]


def _needs_extra(name: str, missing: str) -> Any:
    """Stands in for a command whose module cannot be imported: one clear line, exit 2."""
    sub = typer.Typer()

    @sub.command(name, add_help_option=False,  # --help, too, says what is missing
                 help="(needs: pip install 'thunderserve[serve]')",
                 context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def fail() -> None:
        raise ThunderServeError(f"{name} needs the runtime ('{missing}' is not installed): "
                                "pip install 'thunderserve[serve]'")

    return typer.main.get_group(sub).commands[name]


class LazyGroup(TyperGroup):
    """The root command group, importing a command's module only when that command is used."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loaded: set[str] = set()

    def _load(self, module: str) -> None:
        if module in self._loaded:
            return
        self._loaded.add(module)
        sub = typer.Typer()
        try:
            importlib.import_module(f"thunderserve.cli.{module}").register(sub)
        except ImportError as exc:  # a planning-only install has no runtime (torch, fastapi...)
            for name in sorted(n for n, m in COMMANDS.items() if m == module):
                self.commands.setdefault(name, _needs_extra(name, exc.name or str(exc)))
            return
        for name, cmd in typer.main.get_group(sub).commands.items():
            self.commands.setdefault(name, cmd)

    def list_commands(self, ctx: Any) -> list[str]:
        for module in COMMAND_MODULES:
            self._load(module)
        return sorted(self.commands)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands:
            if cmd_name in COMMANDS:
                self._load(COMMANDS[cmd_name])
            if cmd_name not in self.commands:
                for module in COMMAND_MODULES:
                    self._load(module)
        return self.commands.get(cmd_name)


app = typer.Typer(
    name="thunderserve",
    help="Plan, simulate and serve LLMs on heterogeneous cloud GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)


@app.callback()
def _root() -> None:
    """Plan, simulate and serve LLMs on heterogeneous cloud GPUs."""


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
