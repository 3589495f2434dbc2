"""Admin re-scheduling API and the controller in process (fake engines, real TCP, ASGI client): live flips
without reloads, a dead worker's group dropped while its requests finish elsewhere, clear errors."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np
import pytest
from runtime_builders import collect, fake_deployment, pd_plan, request, run_request

from builders import make_cluster, make_model
from thunderserve.plan import Phase, Plan
from thunderserve.resched.actuator import RouterActuator
from thunderserve.resched.controller import ControllerConfig, ReplanContext, ReschedController
from thunderserve.runtime.api import ApiConfig, create_app
from thunderserve.runtime.api.admin import AdminState
from thunderserve.runtime.router import Finished, Router, RouterConfig
from thunderserve.spec import SloSpec, WorkloadSpec

pytestmark = pytest.mark.anyio
KEY = "sk-admin"
RETRY = RouterConfig(heartbeat_timeout_s=5.0, monitor_interval_s=0.05, max_retries=3)


def controller_for(router: Router, tick_s: float = 0.05) -> ReschedController:
    n = 50
    workload = WorkloadSpec(name="w", arrival_times_s=np.arange(n) * 0.1, prompt_tokens=np.full(n, 100),
                            output_tokens=np.full(n, 50))
    context = ReplanContext(make_cluster((("n0", "TOY", 4),)), make_model(), SloSpec(ttft_ms=2000, tpot_ms=200),
                            workload)
    ctl = ReschedController(RouterActuator(router, drain_timeout_s=2.0), router.plan, context,
                            ControllerConfig(tick_s=tick_s, watch_workload=False), clock=router.clock)
    router.add_observer(ctl.observe)
    return ctl


def client(router: Router, ctl: ReschedController | None, key: str | None = KEY) -> httpx.AsyncClient:
    app = create_app(router, ApiConfig("toy", api_key=KEY), admin=AdminState(router, controller=ctl))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://ts", headers=headers)


def flipped(plan: Plan) -> dict[str, Any]:
    """d1 becomes a prefill group that takes half the requests and ships its KV caches to d0."""
    d = plan.to_dict()
    for g in d["groups"]:
        if g["id"] == "d1":
            g["phase"] = "prefill"
    d["routing"] = {"entry": {"p0": 0.5, "d1": 0.5}, "kv": {"p0": {"d0": 1.0}, "d1": {"d0": 1.0}}}
    return d


async def test_replan_to_a_plan_flips_a_worker_live_without_reloading() -> None:
    async with fake_deployment(pd_plan(1, 2), router_config=RETRY, engine_kwargs={"step_delay_s": 0.005}) as dep:
        router = dep.router
        ctl = controller_for(router)
        async with client(router, ctl) as http:
            assert (await http.get("/admin/plan")).json() == router.plan.to_dict()
            before = {w["group_id"]: w for w in (await http.get("/admin/workers")).json()["data"]}
            assert {g: w["health"] for g, w in before.items()} == {"p0": "ok", "d0": "ok", "d1": "ok"}
            handles = [await router.submit(request(f"load {i}", max_tokens=40)) for i in range(8)]
            await asyncio.sleep(0.05)  # under load
            r = await http.post("/admin/replan", json={"plan": flipped(router.plan)})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["path"] == "explicit" and body["cause"] == "admin: plan"
            assert [(a["kind"], a["group"], a["status"]) for a in body["actions"]] == [
                ("flip", "d1", "applied"), ("routing", None, "applied")]
            assert {g["id"]: g["phase"] for g in body["plan"]["groups"]} == \
                {"p0": "prefill", "d0": "decode", "d1": "prefill"}
            outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 20)
            assert all(isinstance(o.terminal, Finished) and len(o.token_ids) == 40 for o in outs)
            prefills_d1 = len(dep.engines["d1"].prefill_calls)
            for i in range(4):
                out = await run_request(router, request(f"after {i}", max_tokens=5))
                assert out.token_ids == dep.engines["p0"].greedy(list(f"after {i}".encode()), 5)
            assert len(dep.engines["d1"].prefill_calls) > prefills_d1  # d1 now takes requests
            await asyncio.sleep(0.15)  # a heartbeat
            after = {w["group_id"]: w for w in (await http.get("/admin/workers")).json()["data"]}
            assert after["d1"]["role"] == "prefill" and after["d1"]["state"]["role"] == "prefill"
            for g in ("p0", "d0", "d1"):
                assert (after[g]["pid"], after[g]["weights_token"], after[g]["weights_loads"]) == \
                    (before[g]["pid"], before[g]["weights_token"], 1)
            assert router.retries_total == 0
            again = await http.post("/admin/replan", json={"plan": flipped(router.plan)})
            assert again.status_code == 200 and again.json()["actions"] == []  # idempotent


async def test_controller_drops_a_dead_worker_while_its_requests_finish_elsewhere() -> None:
    async with fake_deployment(pd_plan(2, 2), router_config=RETRY, engine_kwargs={"step_delay_s": 0.01}) as dep:
        router = dep.router
        ctl = controller_for(router)
        ctl.start()
        try:
            async with client(router, ctl) as http:
                handles = [await router.submit(request(f"stream {i}", max_tokens=30)) for i in range(10)]
                while dep.servers["d0"].core.state(0).running_decode < 2:
                    await asyncio.sleep(0.01)
                await dep.servers["d0"].stop()
                outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 20)
                for i, out in enumerate(outs):
                    assert out.token_ids == dep.engines["p0"].greedy(list(f"stream {i}".encode()), 30)
                for _ in range(200):
                    if "d0" not in {g["id"] for g in (await http.get("/admin/plan")).json()["groups"]}:
                        break
                    await asyncio.sleep(0.02)
                plan = (await http.get("/admin/plan")).json()
                assert {g["id"] for g in plan["groups"]} == {"p0", "p1", "d1"}
                assert "d0" not in str(plan["routing"]) and plan["estimate"]  # the target's estimate
                status = (await http.get("/admin/resched")).json()
                assert status["enabled"] and status["lost_gpus"] == ["n0:2"] and status["retries_total"] > 0
                assert status["history"][0]["cause"] == "fail:d0"
                workers = {w["group_id"]: w for w in (await http.get("/admin/workers")).json()["data"]}
                assert workers["d0"]["health"] == "removed" and workers["p0"]["health"] == "ok"
                out = await run_request(router, request("afterwards", max_tokens=6))
                assert out.token_ids == dep.engines["p0"].greedy(list(b"afterwards"), 6)
        finally:
            await ctl.stop()


async def test_fail_event_over_http_stops_the_group_and_hands_its_work_over() -> None:
    async with fake_deployment(pd_plan(1, 2), router_config=RETRY, engine_kwargs={"step_delay_s": 0.01}) as dep:
        router = dep.router
        ctl = controller_for(router)
        async with client(router, ctl) as http:
            handles = [await router.submit(request(f"w{i}", max_tokens=30)) for i in range(6)]
            r = await http.post("/admin/replan", json={"event": "fail:n0:2"})  # d1's GPU
            assert r.status_code == 200, r.text
            assert "d1" not in {g["id"] for g in r.json()["plan"]["groups"]}
            assert any(a["kind"] == "drop" and a["group"] == "d1" for a in r.json()["actions"])
            outs = await asyncio.wait_for(asyncio.gather(*[collect(h) for h in handles]), 20)
            for i, out in enumerate(outs):
                assert out.token_ids == dep.engines["p0"].greedy(list(f"w{i}".encode()), 30)
            await asyncio.sleep(0.2)
            assert dep.servers["d1"]._stopped.is_set()  # its worker was shut down
            assert next(w for w in router.workers() if w.group_id == "d1").in_plan is False


async def test_admin_errors_are_clear() -> None:
    async with fake_deployment(pd_plan(1, 1), router_config=RETRY) as dep:
        router = dep.router
        async with client(router, controller_for(router)) as http:
            cases: list[tuple[Any, int, str]] = [
                ({}, 400, "body must be"), ({"event": 3}, 400, "expected a string"),
                ({"event": "reboot:n0"}, 400, "unknown event"), ({"event": "fail:nowhere"}, 400, "unknown node"),
                ({"event": "workload:nope"}, 400, "reads no files for admin events"),
                ({"plan": {"format": "x"}}, 400, "unsupported plan format"),
                ({"plan": {**router.plan.to_dict(), "routing": None}}, 400, "routing: missing"),
                ({"event": "fail:n0", "plan": {}}, 400, "body must be"),
                ({"plan": {**router.plan.to_dict(), "kv_transfer": {"compression": "int4"}}}, 400, "KV compression"),
                ({"plan": {**router.plan.to_dict(), "model": "other"}}, 400, "this server runs 'toy'")]
            for body, status, text in cases:
                r = await http.post("/admin/replan", json=body)
                assert r.status_code == status and text in r.json()["error"]["message"], (body, r.text)
            r = await http.post("/admin/replan", content=b"{nope", headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        async with client(router, None, key=None) as anon:
            assert (await anon.get("/admin/plan")).status_code == 401
            assert (await anon.post("/admin/replan", json={"event": "fail:n0"})).status_code == 401
        async with client(router, None) as http:
            r = await http.post("/admin/replan", json={"event": "fail:n0"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "resched_disabled"
            assert (await http.get("/admin/resched")).json()["enabled"] is False
            assert (await http.get("/admin/plan")).json()["groups"][0]["phase"] == str(Phase.PREFILL)
