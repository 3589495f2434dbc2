"""The module vLLM instances load (`vllm_side/thunderserve_nixl`): a paced NIXL agent and a bounded engine/worker
queue spin, checked against stand-ins for the vLLM and NIXL modules it patches (vLLM is not in our environment;
the e2e test runs it in vLLM's own)."""

from __future__ import annotations

import importlib
import sys
import textwrap
import types
from collections.abc import Iterator
from typing import Any

import pytest

from thunderserve.runtime.vllm.instances import VLLM_SIDE_DIR

NIXL_PKG = "vllm.distributed.kv_transfer.kv_connector.v1.nixl"
SHM = "vllm.distributed.device_communicators.shm_broadcast"


class FakeBindings:
    """Stands for nixl._bindings: records the progress-thread delay of every agent created."""

    def __init__(self) -> None:
        self.created: list[tuple[str, int]] = []

    def nixlAgentConfig(self) -> Any:  # noqa: N802 - the bindings' name
        return types.SimpleNamespace(pthrDelay=-1)

    def nixlAgent(self, name: str, config: Any) -> object:  # noqa: N802
        self.created.append((name, config.pthrDelay))
        return object()


class FakeSpinCondition:
    """Stands for vLLM's shm_broadcast.SpinCondition (a reader spins `busy_loop_s` after each read)."""

    def __init__(self) -> None:
        self.busy_loop_s = 1.0
        self.waits: list[tuple[float, int | None]] = []

    def wait(self, timeout_ms: int | None = None) -> None:
        self.waits.append((self.busy_loop_s, timeout_ms))


def _agent_module(bindings: FakeBindings) -> types.ModuleType:
    """A module like nixl._api: its agent builds the config, sets pthrDelay 0, and calls the module's nixlBind."""
    mod = types.ModuleType("fake_nixl_api")
    exec(textwrap.dedent("""
        class nixl_agent:
            def __init__(self, name, conf=None):
                config = nixlBind.nixlAgentConfig()
                config.pthrDelay = 0
                self.agent = nixlBind.nixlAgent(name, config)
    """), mod.__dict__)
    mod.nixlBind = bindings  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    bindings = FakeBindings()
    api = _agent_module(bindings)
    names = ["vllm", "vllm.distributed", "vllm.distributed.kv_transfer", "vllm.distributed.kv_transfer.kv_connector",
             "vllm.distributed.kv_transfer.kv_connector.v1", NIXL_PKG, f"{NIXL_PKG}.base_worker",
             "vllm.distributed.device_communicators", SHM]
    mods = {n: types.ModuleType(n) for n in names}
    for n in names[1:]:
        parent, _, child = n.rpartition(".")
        setattr(mods[parent], child, mods[n])
    connector = type("NixlConnector", (), {})
    mods[NIXL_PKG].NixlConnector = connector  # type: ignore[attr-defined]
    mods[f"{NIXL_PKG}.base_worker"].NixlWrapper = api.nixl_agent  # type: ignore[attr-defined]
    mods[SHM].SpinCondition = FakeSpinCondition  # type: ignore[attr-defined]
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    monkeypatch.syspath_prepend(str(VLLM_SIDE_DIR))
    monkeypatch.delitem(sys.modules, "thunderserve_nixl", raising=False)
    original_wait = FakeSpinCondition.wait
    yield {"bindings": bindings, "api": api, "connector": connector, "worker": mods[f"{NIXL_PKG}.base_worker"]}
    FakeSpinCondition.wait = original_wait  # type: ignore[method-assign]
    sys.modules.pop("thunderserve_nixl", None)


def test_paced_agent_sets_the_progress_delay_and_leaves_nixl_as_it_was(fake_vllm: dict[str, Any],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THUNDERSERVE_NIXL_PROGRESS_DELAY_US", "1000")
    monkeypatch.delenv("THUNDERSERVE_VLLM_SPIN_S", raising=False)
    side = importlib.import_module("thunderserve_nixl")
    assert side.NixlConnector is fake_vllm["connector"]  # vLLM's own connector, under its own name
    agent_cls = fake_vllm["worker"].NixlWrapper
    assert issubclass(agent_cls, fake_vllm["api"].nixl_agent) and agent_cls is not fake_vllm["api"].nixl_agent
    agent_cls("paced")
    fake_vllm["api"].nixl_agent("plain")  # NIXL's own class is untouched once the paced agent exists
    assert fake_vllm["bindings"].created == [("paced", 1000), ("plain", 0)]
    assert fake_vllm["api"].nixlBind is fake_vllm["bindings"]
    cond = FakeSpinCondition()
    cond.wait(5)
    assert cond.waits == [(1.0, 5)]  # no spin bound asked for


def test_spin_bound_caps_every_reader_once(fake_vllm: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THUNDERSERVE_NIXL_PROGRESS_DELAY_US", raising=False)
    monkeypatch.setenv("THUNDERSERVE_VLLM_SPIN_S", "0")
    side = importlib.import_module("thunderserve_nixl")
    assert fake_vllm["worker"].NixlWrapper is fake_vllm["api"].nixl_agent  # no delay asked for
    cond = FakeSpinCondition()
    cond.wait(7)
    cond.wait(None)
    assert cond.waits == [(0.0, 7), (0.0, None)]
    wrapped = FakeSpinCondition.wait
    side.bound_spin(FakeSpinCondition, 0.5)  # already bounded: not wrapped twice
    assert FakeSpinCondition.wait is wrapped
