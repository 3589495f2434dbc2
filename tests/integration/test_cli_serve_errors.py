"""`thunderserve serve` rejects bad options with one line and exit code 2 before any worker starts."""

from __future__ import annotations

import sys

import pytest

from thunderserve.cli import main


def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["thunderserve", "serve", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--demo", "--max-retries", "-1"], "error: --max-retries: must be >= 0\n"),
    (["--demo", "--backend", "k8s"], "error: --backend: unknown backend 'k8s' (local, ray)\n"),
    (["--demo", "--device", "tpu"], "error: --device: unknown device 'tpu' (auto, cpu, cuda)\n"),
    (["--demo", "--ray-address", "auto"], "error: --ray-address: --ray-address needs --backend ray\n"),
    (["--demo", "--cpu-threads", "0"], "error: --cpu-threads: must be at least 1\n"),
    (["--demo", "--port", "70000"], "error: --port: must be in [0, 65535]\n"),
    ([], "error: --plan: missing (or use --demo)\n"),
])
def test_bad_serve_options_are_one_line(monkeypatch, capsys, args, message) -> None:  # type: ignore[no-untyped-def]
    code, err = run(monkeypatch, capsys, *args)
    assert code == 2
    assert err == message


def test_unknown_resched_workload_is_named(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    code, err = run(monkeypatch, capsys, "--demo", "--resched-workload", "no-such-preset")
    assert code == 2
    assert err.startswith("error: ") and "no-such-preset" in err and err.count("\n") == 1


def test_a_taken_port_is_one_line_before_any_worker_starts(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = run(monkeypatch, capsys, "--demo", "--model", "fake", "--port", str(port))
    assert code == 2
    assert err.startswith(f"error: --port: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--admin-files-dir", "/no/such/folder"], "error: --admin-files-dir: not a folder\n"),
    (["--max-body-bytes", "100"], "error: --max-body-bytes: must be in [1024, 12582912] (a request must fit one "
                                  "worker frame)\n"),
    (["--max-queued-requests", "0"], "error: --max-queued-requests: must be at least 1\n"),
])
def test_bad_limit_options_are_one_line(monkeypatch, capsys, args, message) -> None:  # type: ignore[no-untyped-def]
    code, err = run(monkeypatch, capsys, "--demo", "--model", "fake", *args)
    assert code == 2 and err == message
