"""The command line starts without the runtime: planning and simulation import no torch and no server stack,
and a runtime command without the `serve` extra is one clear line (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
RUNTIME = ("torch", "transformers", "fastapi", "uvicorn", "safetensors", "gguf")


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def test_cli_and_planning_import_no_runtime() -> None:
    code = f"""
import json, sys
import thunderserve.cli
from thunderserve.cli import main
sys.argv = ["thunderserve", "plan", "--help"]
try:
    main()
except SystemExit:
    pass
import thunderserve.scheduler.planner, thunderserve.sim, thunderserve.sim.replay, thunderserve.resched.replan
print(json.dumps(sorted(m for m in {RUNTIME!r} if m in sys.modules)))
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_runtime_commands_without_the_serve_extra_say_how_to_get_it() -> None:
    for args in (["serve", "--demo", "--model", "fake"], ["calibrate", "--help"], ["bench-serve"]):
        code = f"""
import sys
for m in {RUNTIME!r} + ("httpx",):
    sys.modules[m] = None  # as if not installed
from thunderserve.cli import main
sys.argv = ["thunderserve", *{args!r}]
main()
"""
        done = _python(code)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith(f"error: {args[0]} needs the runtime (") and done.stderr.count("\n") == 1
        assert "pip install 'thunderserve[serve]'" in done.stderr


def test_plan_help_imports_no_solver_stack_or_numpy() -> None:
    """`plan --help` only parses options: the planner's heavy dependencies load when a plan is made (the CPU
    figure is in the README; what is imported is the part a test can check on any machine)."""
    code = """
import json, sys
from thunderserve.cli import main
sys.argv = ["thunderserve", "plan", "--help"]
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & {"scipy", "networkx", "highspy", "torch", "numpy"})))
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
