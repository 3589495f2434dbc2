"""Builders for runtime tests: an in-process deployment (worker servers + router) on fake engines."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from builders import make_plan
from thunderserve.plan import Phase, Plan
from thunderserve.runtime.engine.base import SamplingParams
from thunderserve.runtime.fakes import FakeEngine, RawKvCodec
from thunderserve.runtime.router import Accepted, Delta, Failed, Finished, RequestHandle, Router, RouterConfig
from thunderserve.runtime.workers.codec import KvCodec
from thunderserve.runtime.workers.protocol import GenerateRequest, WorkerConfig
from thunderserve.runtime.workers.server import WorkerServer


def pd_plan(num_prefill: int = 1, num_decode: int = 1, kv: dict[str, dict[str, float]] | None = None,
            entry: dict[str, float] | None = None, colocated: Sequence[str] = ()) -> Plan:
    """p0..p{n-1} prefill, d0..d{m-1} decode (+ colocated ids), equal shares unless given."""
    groups: list[tuple[str, str, list[list[str]], list[int]]] = []
    gpu = 0
    for gid, phase in ([(f"p{i}", "prefill") for i in range(num_prefill)]
                       + [(f"d{i}", "decode") for i in range(num_decode)] + [(c, "colocated") for c in colocated]):
        groups.append((gid, phase, [[f"n0:{gpu}"]], [0, 2]))
        gpu += 1
    takers = [g[0] for g in groups if g[1] != "decode"]
    decoders = [g[0] for g in groups if g[1] == "decode"]
    entry = entry or {g: 1 / len(takers) for g in takers}
    if kv is None:
        kv = {f"p{i}": {d: 1 / len(decoders) for d in decoders} for i in range(num_prefill)} if decoders else {}
    return make_plan(groups, entry=entry, kv=kv)


@dataclass
class FakeDeployment:
    plan: Plan
    servers: dict[str, WorkerServer]
    engines: dict[str, FakeEngine]
    router: Router
    results: list[Any] = field(default_factory=list)


@contextlib.asynccontextmanager
async def fake_deployment(plan: Plan, *, router_config: RouterConfig | None = None,
                          engine_kwargs: dict[str, Any] | None = None,
                          worker_kwargs: dict[str, Any] | None = None,
                          codec: KvCodec | None = None) -> AsyncIterator[FakeDeployment]:
    """Worker servers for every plan group (fake engines, raw KV codec unless given) and a started router."""
    servers: dict[str, WorkerServer] = {}
    engines: dict[str, FakeEngine] = {}
    for g in plan.groups:
        engines[g.id] = FakeEngine(**(engine_kwargs or {}))
        knobs: dict[str, Any] = {"heartbeat_interval_s": 0.05, "kv_timeout_s": 5.0, **(worker_kwargs or {})}
        cfg = WorkerConfig(group_id=g.id, role=g.phase, **knobs)
        servers[g.id] = WorkerServer(engines[g.id], cfg, codec or RawKvCodec())
        await servers[g.id].start()
    router = Router(plan, {g: ("127.0.0.1", s.control_port) for g, s in servers.items()},
                    router_config or RouterConfig(heartbeat_timeout_s=5.0, monitor_interval_s=0.05))
    await router.start()
    dep = FakeDeployment(plan, servers, engines, router)
    try:
        yield dep
    finally:
        await router.close()
        for s in servers.values():
            await s.stop()


def request(prompt: str = "hello", max_tokens: int = 8, temperature: float = 0.0, seed: int = 0,
            stop: Sequence[str] = (), **kw: Any) -> GenerateRequest:
    return GenerateRequest(request_id=kw.pop("request_id", uuid.uuid4().hex), seed=seed, prompt=prompt,
                           max_tokens=max_tokens, sampling=SamplingParams(max_tokens=max_tokens,
                                                                          temperature=temperature, stop=tuple(stop)),
                           **kw)


@dataclass
class Outcome:
    events: list[Any]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def token_ids(self) -> list[int]:
        return [t for e in self.events if isinstance(e, Delta) for t in e.token_ids]

    @property
    def terminal(self) -> Finished | Failed:
        last = self.events[-1]
        assert isinstance(last, Finished | Failed), self.events
        return last

    @property
    def accepted(self) -> Accepted | None:
        return next((e for e in self.events if isinstance(e, Accepted)), None)


async def collect(handle: RequestHandle) -> Outcome:
    return Outcome([ev async for ev in handle])


async def run_request(router: Router, req: GenerateRequest) -> Outcome:
    return await collect(await router.submit(req))


def phases(dep: FakeDeployment) -> dict[str, Phase]:
    return {w.group_id: Phase(w.role) for w in dep.router.workers()}


# ---- processes (no orphans) ------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def child_pids(pid: int, spawned_only: bool = False) -> list[int]:
    """Child processes of `pid`; `spawned_only` leaves out multiprocessing's resource tracker."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except (OSError, ValueError, IndexError):
            continue
        if parent == pid and not (spawned_only and b"resource_tracker" in cmd):
            out.append(int(entry))
    return out


def wait_gone(pids: Sequence[int], timeout_s: float = 10.0) -> list[int]:
    """Wait until every pid is gone; the ones still alive after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]
