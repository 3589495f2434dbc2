"""The admin hook: live deployment state and controls behind `/admin/*` (same API key as /v1).

`AdminState` is what admin endpoints talk to: the router (workers, current plan, role flips, routing
updates) and, when there is one, the launcher-side deployment. A later feature adds endpoints without
touching the app factory: it appends a FastAPI `APIRouter` to `AdminState.routes` before `create_app`
(e.g. `/admin/plan`, `/admin/replan`), and its handlers reach this object via `request.app.state.admin`.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Protocol

from fastapi import APIRouter, Request

from thunderserve.plan.model import Phase, Plan, Routing
from thunderserve.runtime.router import Router


class DeploymentHandle(Protocol):
    """What the launcher side exposes to admin code (process ids; stop)."""

    def worker_pids(self) -> dict[str, int]: ...


class AdminState:
    def __init__(self, router: Router, deployment: DeploymentHandle | None = None) -> None:
        self.router = router
        self.deployment = deployment
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
            out.append(d)
        return out

    async def set_role(self, group_id: str, role: Phase | str) -> None:
        await self.router.set_role(group_id, role)

    async def update_routing(self, routing: Routing) -> None:
        await self.router.update_routing(routing)


def admin_routes() -> APIRouter:
    """Read-only admin endpoints every deployment has."""
    r = APIRouter()

    @r.get("/admin/workers")
    async def workers(request: Request) -> dict[str, Any]:
        admin: AdminState = request.app.state.admin
        return {"object": "list", "data": admin.workers()}

    return r
