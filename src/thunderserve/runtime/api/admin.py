"""The admin hook: live deployment state and controls behind `/admin/*` (same API key as /v1).

`AdminState` is what admin endpoints talk to: the router (workers, current plan, role flips, routing
updates), the launcher-side deployment when there is one, and the re-scheduling controller when it runs.
A later feature adds endpoints without touching the app factory: it appends a FastAPI `APIRouter` to
`AdminState.routes` before `create_app`; its handlers reach this object via `request.app.state.admin`.

Endpoints (all JSON):
    GET  /admin/workers   every worker: group, role, pid, health ("ok" | "late" | "restarting" | "down" |
                          "removed"), restarts, weights_token, weights_loads (1 = loaded once; a reload or
                          a restart raises it), latest heartbeat state
    GET  /admin/plan      the plan running now (phases and routing reflect live changes; the planner's
                          estimate is the target's)
    POST /admin/replan    {"event": "fail:NODE[:I]" | "workload:NAME|CSV" | "add:NODE.yaml"} re-plans as if
                          the event had been detected; {"plan": {...}} reconciles toward that plan.
                          Returns {"plan": running plan, "target", "cause", "path", "decision_time_s",
                          "changes", "actions": [{kind, group, status, reason, detail}]}
                          Files (a workload CSV, a node YAML) are read only inside the folder given at start
                          (`AdminFiles`, none by default: presets only); see `api.admin_files`.
    GET  /admin/resched   the controller's decisions so far, GPUs it considers lost, request retries
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, Request

from thunderserve.errors import ThunderServeError
from thunderserve.plan.model import Phase, Plan, Routing, plan_from_dict
from thunderserve.runtime.api.admin_files import AdminFiles, confine_event
from thunderserve.runtime.api.limits import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_JSON_DEPTH,
    parse_json,
    read_body,
)
from thunderserve.runtime.api.protocol import ApiError
from thunderserve.runtime.frontend import Frontend

if TYPE_CHECKING:
    from thunderserve.resched.controller import ControlRecord, ReschedController

log = logging.getLogger("thunderserve.admin")

class DeploymentHandle(Protocol):
    """What the launcher side exposes to admin code (process ids; stop)."""

    def worker_pids(self) -> dict[str, int]: ...


class AdminState:
    def __init__(self, router: Frontend, deployment: DeploymentHandle | None = None,
                 controller: ReschedController | None = None, files: AdminFiles = AdminFiles()) -> None:
        self.router = router
        self.deployment = deployment
        self.controller = controller
        self.files = files
        self.routes: list[APIRouter] = [admin_routes()]

    @property
    def plan(self) -> Plan:
        """The plan as running now (roles and routing reflect live changes)."""
        return self.router.plan

    def workers(self) -> list[dict[str, Any]]:
        out = []
        for w in self.router.workers():
            d = asdict(w)
            d["state"] = w.state.to_dict() if w.state is not None else None
            d["health"] = ("removed" if not w.in_plan else "ok" if w.alive else "late" if w.late
                           else "restarting" if w.restarting else "down")
            out.append(d)
        return out

    async def set_role(self, group_id: str, role: Phase | str) -> None:
        await self.router.set_role(group_id, role)

    async def update_routing(self, routing: Routing) -> None:
        await self.router.update_routing(routing)

    async def replan(self, body: Any) -> dict[str, Any]:
        """POST /admin/replan: an event or an explicit plan through the controller."""
        from thunderserve.resched.events import EventKind, parse_event
        from thunderserve.runtime.launch.base import check_servable

        if self.controller is None:
            raise ApiError(503, "re-scheduling is not enabled on this server", "server_error",
                           code="resched_disabled")
        if not isinstance(body, dict) or len({"event", "plan"} & set(body)) != 1 or set(body) - {"event", "plan"}:
            raise ApiError(400, 'body must be {"event": "fail:NODE[:I]" | "workload:NAME|CSV" | "add:NODE.yaml"} '
                                'or {"plan": {...}}', param="event", code="invalid_value")
        try:
            if "event" in body:
                if not isinstance(body["event"], str):
                    raise ApiError(400, "event: expected a string like fail:NODE[:I]", param="event")
                event = await asyncio.to_thread(confine_event, parse_event(body["event"]), self.files)
                try:
                    record = await self.controller.replan_event(event)
                except ThunderServeError as exc:
                    if event.kind is EventKind.FAIL:
                        raise
                    # a file's loader may quote its content (a header, a row): log it, answer without it
                    log.warning("admin event %s: %s", body["event"], exc)
                    what = "trace CSV" if event.kind is EventKind.WORKLOAD else "node YAML"
                    raise ApiError(400, f"event {body['event']}: not a valid {what} (details in the server log)",
                                   param="event", code="invalid_file") from None
            else:
                plan = plan_from_dict(body["plan"], "plan")
                check_servable(plan)
                # the compression is fixed while serving (the gate's stamp on it may differ)
                if plan.kv_transfer.compression != self.plan.kv_transfer.compression:
                    raise ApiError(400, "plan: kv_transfer: the workers' KV compression is fixed while serving "
                                        f"({self.plan.kv_transfer.compression}); restart to change it", param="plan")
                if plan.model != self.plan.model:
                    raise ApiError(400, f"plan: model: this server runs '{self.plan.model}', not '{plan.model}'",
                                   param="plan")
                record = await self.controller.replan_to(plan)
        except ThunderServeError as exc:
            raise ApiError(400, str(exc), param="event" if "event" in body else "plan") from None
        return self._record_body(record)

    def _record_body(self, record: ControlRecord) -> dict[str, Any]:
        d = record.to_dict()
        return {"plan": self.plan.to_dict(), **d}

    def resched_status(self) -> dict[str, Any]:
        c = self.controller
        return {"enabled": c is not None, "retries_total": self.router.retries_total,
                "lost_gpus": sorted(c.lost_gpus) if c is not None else [],
                "target": c.target.to_dict() if c is not None else None,
                "history": [r.to_dict() for r in c.history] if c is not None else []}


def admin_routes() -> APIRouter:
    """Admin endpoints every deployment has (re-planning answers 503 without a controller)."""
    r = APIRouter()

    @r.get("/admin/workers")
    async def workers(request: Request) -> dict[str, Any]:
        admin: AdminState = request.app.state.admin
        return {"object": "list", "data": admin.workers()}

    @r.get("/admin/plan")
    async def plan(request: Request) -> dict[str, Any]:
        admin: AdminState = request.app.state.admin
        return admin.plan.to_dict()

    @r.post("/admin/replan")
    async def replan(request: Request) -> dict[str, Any]:
        admin: AdminState = request.app.state.admin
        raw = await read_body(request, DEFAULT_MAX_BODY_BYTES)
        body = await asyncio.to_thread(parse_json, raw, DEFAULT_MAX_JSON_DEPTH)
        return await admin.replan(body)

    @r.get("/admin/resched")
    async def resched(request: Request) -> dict[str, Any]:
        admin: AdminState = request.app.state.admin
        return admin.resched_status()

    return r
