"""The router surface the API, admin endpoints, metrics and re-scheduling speak to, whatever the engine.

Two implementations: `runtime.router.Router` (built-in workers over our frame protocol) and
`runtime.vllm.router.VllmRouter` (vLLM instances over HTTP, through `runtime.vllm.client.GroupClient`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from thunderserve.plan.model import Phase, Plan, Routing
from thunderserve.resched.monitor import InFlight
from thunderserve.runtime.router_records import RequestHandle, RequestRecord, WorkerInfo
from thunderserve.runtime.workers.protocol import GenerateRequest


class Frontend(Protocol):
    plan: Plan  # the plan as running now (live phases and routing)
    retries_total: int
    clock: Callable[[], float]

    async def start(self) -> None: ...

    async def close(self, shutdown_workers: bool = False) -> None: ...

    def add_observer(self, fn: Callable[[RequestRecord], None]) -> None: ...

    @property
    def num_pending(self) -> int: ...

    @property
    def max_context_tokens(self) -> int: ...

    def entry_groups(self) -> list[str]: ...

    async def submit(self, req: GenerateRequest) -> RequestHandle: ...

    async def cancel(self, request_id: str) -> None: ...

    async def set_role(self, group_id: str, role: Phase | str) -> None: ...

    async def update_routing(self, routing: Routing, rebalance: bool = False) -> None: ...

    async def remove_group(self, group_id: str, drain_timeout_s: float = 0.0) -> None: ...

    def set_estimate(self, estimate: Mapping[str, Any]) -> None: ...

    def in_flight(self) -> dict[str, InFlight]: ...

    def workers(self) -> list[WorkerInfo]: ...
