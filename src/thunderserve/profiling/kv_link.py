"""The KV path between two workers on this machine: the runtime's own KV transport over loopback TCP.

Workers of a local deployment hand a prefilled request's KV cache over with `runtime.kv.transport`
(`KvSender.send_kv` -> `KvReceiver` -> acknowledgement), after encoding it with the plan's codec and before
the decode side restores it. `measure_transfer_s` times that send -> ack round trip for already-encoded
payloads (median of `repeats` after `warmup`, over one persistent connection, as a worker keeps one per
peer), so the profile holds every step of the path: encode, transfer, decode (`KvMeasurement`).
`EngineProfile.kv_link_gbs` turns them into the effective link bandwidth the simulator's KV transfer uses.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

Clock = Callable[[], float]


async def _transfer_s(payloads: Mapping[str, bytes], warmup: int, repeats: int, clock: Clock) -> dict[str, float]:
    from thunderserve.runtime.kv.transport import KvReceiver, KvSender

    async def accept(_header: dict[str, Any], _payload: bytes) -> None:
        return None

    receiver = KvReceiver(accept)
    port = await receiver.start("127.0.0.1", 0)
    sender = KvSender("127.0.0.1", port)
    out: dict[str, float] = {}
    try:
        for key, payload in payloads.items():
            times = []
            for i in range(warmup + repeats):
                t0 = clock()
                ack = await sender.send_kv(f"profile-{key}-{i}", {"profile": True}, payload)
                if i >= warmup:
                    times.append(clock() - t0)
                if not ack.ok:
                    raise RuntimeError(f"loopback KV receiver refused the payload: {ack.error}")
            out[key] = max(statistics.median(times), 1e-9)
    finally:
        await sender.close()
        await receiver.close()
    return out


def measure_transfer_s(payloads: Mapping[str, bytes], *, warmup: int = 1, repeats: int = 3,
                       clock: Clock = time.perf_counter) -> dict[str, float]:
    """Median send -> acknowledgement seconds of each payload over loopback TCP (runtime KV transport)."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be positive and warmup non-negative")
    if not payloads:
        return {}
    return asyncio.run(_transfer_s(payloads, warmup, repeats, clock))
