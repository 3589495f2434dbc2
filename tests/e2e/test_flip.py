"""Flip a worker from decode to prefill (and back) under load through /admin/replan, on the tiny random Llama
with local worker processes: no weight reload (same pid, same weights_token, one load), no request fails or is
retried, every stream is exact, and the flipped worker takes new requests."""

from __future__ import annotations

import asyncio
import copy
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_chaos import (
    AUTH,
    Stream,
    assert_exact,
    pd_plan_json,
    request_body,
    run_streams,
    serve_plan,
    wait_until,
)
from test_serve_cli_fake import wait_gone
from tiny_llama import build_tiny_llama

pytestmark = pytest.mark.slow
NUM_REQUESTS = 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def with_d1_prefill(plan: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(plan)
    for g in out["groups"]:
        if g["id"] == "d1":
            g["phase"] = "prefill"
    out["routing"] = {"entry": {"p0": 0.5, "d1": 0.5}, "kv": {"p0": {"d0": 1.0}, "d1": {"d0": 1.0}}}
    return out


def replan_under_load(url: str, target: dict[str, Any]):  # type: ignore[no-untyped-def]
    """A coroutine factory for `run_streams`: POST the target plan once decoding is under way."""
    async def during(streams: list[Stream]) -> tuple[int, dict[str, Any], int]:
        while sum(1 for s in streams if len(s.token_ids) >= 2) < 4 and not all(s.done for s in streams):
            await asyncio.sleep(0.01)
        unfinished = sum(1 for s in streams if not s.done)
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{url}/admin/replan", json={"plan": target}, headers=AUTH)
        return r.status_code, r.json(), unfinished

    return during


def test_flip_decode_to_prefill_and_back_under_load(model_dir: Path, tmp_path: Path) -> None:
    plan = pd_plan_json(1, 2)
    target = with_d1_prefill(plan)
    bodies = [request_body(i) for i in range(NUM_REQUESTS)]
    with serve_plan(plan, tmp_path, model_dir) as srv:
        reference, _ = asyncio.run(run_streams(srv.url, bodies))
        assert_exact(reference, bodies, None)
        before = srv.workers()

        t0 = time.monotonic()
        streams, (status, body, unfinished) = asyncio.run(run_streams(srv.url, bodies,
                                                                      replan_under_load(srv.url, target)))
        flip_s = time.monotonic() - t0
        assert status == 200, body
        assert unfinished > 0  # the flip happened with streams in flight
        assert [(a["kind"], a["group"], a["status"]) for a in body["actions"]] == [
            ("flip", "d1", "applied"), ("routing", None, "applied")]
        assert_exact(streams, bodies, reference)  # nothing failed, nothing changed

        wait_until(lambda: (srv.workers()["d1"]["state"] or {}).get("role") == "prefill", 10, "d1's heartbeat")
        after = srv.workers()
        for g in ("p0", "d0", "d1"):  # no reload anywhere: same process, same weights, loaded once
            assert (after[g]["pid"], after[g]["weights_token"], after[g]["weights_loads"], after[g]["health"]) == \
                (before[g]["pid"], before[g]["weights_token"], 1, "ok")
        assert after["d1"]["role"] == "prefill"
        running = srv.get("/admin/plan")
        assert {g["id"]: g["phase"] for g in running["groups"]} == {"p0": "prefill", "d0": "decode", "d1": "prefill"}
        assert running["routing"] == target["routing"]

        prefilled = after["d1"]["state"]["prefill_tokens_total"]
        more, _ = asyncio.run(run_streams(srv.url, bodies[:10]))
        assert_exact(more, bodies[:10], reference[:10])
        wait_until(lambda: srv.workers()["d1"]["state"]["prefill_tokens_total"] > prefilled, 10,
                   "d1 to prefill new requests")

        streams, (status, body, unfinished) = asyncio.run(run_streams(srv.url, bodies,
                                                                      replan_under_load(srv.url, plan)))
        assert status == 200 and unfinished > 0
        assert [(a["kind"], a["group"]) for a in body["actions"]] == [("routing", None), ("flip", "d1")]
        assert_exact(streams, bodies, reference)
        assert srv.get("/admin/resched")["retries_total"] == 0
        final = srv.workers()
        assert all(final[g]["weights_loads"] == 1 and final[g]["pid"] == before[g]["pid"] for g in final)
        print(f"\nflip: 40 streams with a live decode->prefill flip in {flip_s:.1f} s; no reload, no retry")

        pids = [w["pid"] for w in final.values()]
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0
        assert wait_gone(pids, 10) == []
