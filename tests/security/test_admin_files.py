"""/admin/replan reads files only inside the folder it was given, capped in size, and never echoes them."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from runtime_builders import fake_deployment, pd_plan
from test_retry_admin import RETRY, controller_for

from thunderserve.resched.events import parse_event
from thunderserve.runtime.api import ApiConfig, create_app
from thunderserve.runtime.api.admin import AdminState
from thunderserve.runtime.api.admin_files import AdminFiles, confine_event
from thunderserve.runtime.api.protocol import ApiError

pytestmark = pytest.mark.anyio
SECRET = "root:x:0:0:very-secret-line"


def _code(text: str, files: AdminFiles) -> str:
    with pytest.raises(ApiError) as exc:
        confine_event(parse_event(text), files)
    return str(exc.value.body["error"]["code"])


def test_without_a_folder_only_presets_are_allowed(tmp_path: Path) -> None:
    assert confine_event(parse_event("workload:coding"), AdminFiles()).workload == "coding"
    for text in ("workload:/dev/zero", "workload:/etc/passwd", "add:/etc/hosts", f"workload:{tmp_path}"):
        assert _code(text, AdminFiles()) == "file_not_allowed"


def test_a_folder_confines_paths_to_regular_files_inside_it(tmp_path: Path) -> None:
    folder = tmp_path / "admin"
    folder.mkdir()
    (folder / "ok.csv").write_text("arrival_time_s,prompt_tokens,output_tokens\n0,10,5\n")
    (folder / "big.csv").write_bytes(b"x" * 2048)
    (tmp_path / "outside.csv").write_text(SECRET)
    os.symlink(tmp_path / "outside.csv", folder / "link.csv")
    os.symlink("/dev/zero", folder / "zero")
    os.mkfifo(folder / "fifo")
    files = AdminFiles(folder, max_bytes=1024)
    assert confine_event(parse_event("workload:ok.csv"), files).workload == str((folder / "ok.csv").resolve())
    assert confine_event(parse_event(f"workload:{folder}/ok.csv"), files).workload == str(folder / "ok.csv")
    assert _code("workload:../outside.csv", files) == "file_not_allowed"
    assert _code(f"workload:{tmp_path}/outside.csv", files) == "file_not_allowed"
    assert _code("workload:link.csv", files) == "file_not_allowed"  # a symlink out of the folder
    assert _code("workload:zero", files) == "file_not_allowed"
    assert _code("workload:fifo", files) == "file_not_allowed"  # would block the reader for ever
    assert _code("workload:big.csv", files) == "file_too_large"
    assert _code("add:missing.yaml", files) == "file_not_found"


async def test_admin_replan_errors_never_echo_file_contents(tmp_path: Path) -> None:
    (tmp_path / "passwd.csv").write_text(SECRET + "\n")
    (tmp_path / "node.yaml").write_text(f"name: [{SECRET}\n")
    async with fake_deployment(pd_plan(1, 1), router_config=RETRY) as dep:
        router = dep.router
        admin = AdminState(router, controller=controller_for(router), files=AdminFiles(tmp_path))
        app = create_app(router, ApiConfig("toy"), admin=admin)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ts") as http:
            for event in ("workload:passwd.csv", "add:node.yaml", "workload:/etc/passwd", "workload:/dev/zero"):
                r = await http.post("/admin/replan", json={"event": event})
                assert r.status_code == 400, r.text
                assert "secret" not in r.text and "root:" not in r.text
            r = await http.post("/admin/replan", content=b"[" * 50_000, headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
            assert (await http.get("/health")).json()["status"] == "ok"
