"""vLLM's NixlConnector with a paced NIXL progress thread (loaded by vLLM as `kv_connector_module_path`).

Why: NIXL's Python agent creates its UCX backend with a progress thread whose poll timeout (`pthrDelay`) is
hard-coded to 0, so that thread busy-polls: one core per vLLM instance, idle or not. On a machine whose engines
share a few cores, the two instances of a 1 prefill + 1 decode deployment then spend most of the CPU spinning
(measured on 2 cores: ~0.99 of a core per agent while idle, 0.03 with a 1 ms delay). With
`THUNDERSERVE_NIXL_PROGRESS_DELAY_US` set, the agent is created with that `pthrDelay` (NIXL rounds it up to
whole milliseconds): the thread still wakes at once on UCX events (it polls the workers' event fds), and at the
latest after the delay.

With `THUNDERSERVE_VLLM_SPIN_S` set, it also bounds how long vLLM's engine and worker processes spin
(`sched_yield` loop, 1 s by default) waiting on each other's shared-memory queue before sleeping on its zmq
notification: on a CPU build the engine process otherwise spins for the whole of every model step the worker
computes, taking CPU from that worker and from the other instance when instances share cores (this module is
imported by both processes, as both create the connector).

The connector itself is vLLM's, unchanged: the class is re-exported under its own name, so vLLM's checks for
"NixlConnector" still apply. Importing this module swaps the NIXL agent class vLLM's NIXL worker creates.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker as _worker

DELAY_ENV = "THUNDERSERVE_NIXL_PROGRESS_DELAY_US"
SPIN_ENV = "THUNDERSERVE_VLLM_SPIN_S"

__all__ = ["NixlConnector", "bound_spin", "paced_agent_class"]


class _PacedBindings:
    """NIXL's bindings module, except that agents are created with a progress-thread delay."""

    def __init__(self, real: Any, delay_us: int) -> None:
        self._real = real
        self._delay_us = delay_us

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def nixlAgent(self, name: str, config: Any) -> Any:  # noqa: N802 - the bindings' name
        config.pthrDelay = self._delay_us
        return self._real.nixlAgent(name, config)


def paced_agent_class(base: Any, delay_us: int) -> Any:
    """A subclass of NIXL's Python agent `base` whose progress thread waits up to `delay_us` between polls."""

    class PacedNixlAgent(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            module_globals = base.__init__.__globals__
            real = module_globals["nixlBind"]
            module_globals["nixlBind"] = _PacedBindings(real, delay_us)
            try:
                super().__init__(*args, **kwargs)
            finally:
                module_globals["nixlBind"] = real

    return PacedNixlAgent


def bound_spin(condition_class: Any, spin_s: float) -> None:
    """Readers of vLLM's shared-memory queues (`condition_class`: its SpinCondition) spin at most `spin_s`
    after a read before waiting on the queue's notification (the writer notifies on every write)."""
    original = condition_class.wait
    if getattr(original, "_thunderserve_bounded", False):
        return

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        if getattr(self, "busy_loop_s", 0) > spin_s:
            self.busy_loop_s = spin_s
        original(self, timeout_ms)

    wait._thunderserve_bounded = True  # type: ignore[attr-defined]
    condition_class.wait = wait


def _install() -> None:
    delay_us = int(os.environ.get(DELAY_ENV) or 0)
    agent = _worker.NixlWrapper
    if agent is not None and delay_us > 0 and "nixlBind" in getattr(agent.__init__, "__globals__", {}):
        _worker.NixlWrapper = paced_agent_class(agent, delay_us)
    spin = os.environ.get(SPIN_ENV)
    if spin:
        from vllm.distributed.device_communicators import shm_broadcast

        bound_spin(shm_broadcast.SpinCondition, float(spin))


_install()
