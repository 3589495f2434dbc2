"""The simulator's lightweight rollout: make before break. Groups turning prefill (a full drain) go first while
the groups turning decode keep serving their old role under the old routing; they flip once the new prefill
group serves, so some group takes requests at every moment, and nothing is lost."""

from __future__ import annotations

import numpy as np
from sim_builders import constant_workload, two_node_cluster

from builders import make_model, make_plan
from thunderserve.plan import Phase
from thunderserve.resched.replan import ReplanResult, diff_plans
from thunderserve.sim import SimConfig
from thunderserve.sim.dynamic import DynamicReplay
from thunderserve.sim.kernel import PRIORITY_DECIDE
from thunderserve.sim.replay import _Requests
from thunderserve.sim.resched_loop import _Controller, _Pending, _Record
from thunderserve.sim.timeline_types import ReschedPolicy, TimelineConfig
from thunderserve.spec import SloSpec

CLUSTER = two_node_cluster()
MODEL = make_model(num_layers=8, hidden_size=4096, num_heads=32, num_kv_heads=32, intermediate_size=11008)
L = [0, 8]
GPUS = ("a:0", "a:1", "b:0", "b:1")
OLD = make_plan([(f"c{i}", "colocated", [[g]], L) for i, g in enumerate(GPUS)], entry={f"c{i}": 0.25 for i in range(4)})
NEW = make_plan([("c0", "prefill", [["a:0"]], L)] + [(f"c{i}", "decode", [[GPUS[i]]], L) for i in (1, 2, 3)],
                entry={"c0": 1.0}, kv={"c0": {"c1": 0.34, "c2": 0.33, "c3": 0.33}})
SLO = SloSpec(ttft_ms=2000, tpot_ms=60, attainment_target=0.9)
CFG = TimelineConfig(watch_after_s=1e9)  # no detection: the test applies one decision by hand


def run_rollout(apply_at: float = 5.0):  # type: ignore[no-untyped-def]
    wl = constant_workload(300, 2000)  # ~6 s of decoding each: the flip into prefill waits for it
    t, p, o = wl.poisson_requests(10.0, 20.0, seed=3)
    replay = DynamicReplay(CLUSTER, MODEL, _Requests(t, p, o), SimConfig(warmup_s=0))
    ctl = _Controller(replay, ReschedPolicy.LIGHTWEIGHT, OLD, CLUSTER, MODEL, SLO, wl, 10.0, [], {}, CFG,
                      float(t[-1]))
    replay.install(OLD)
    ctl.start()
    replay.start()
    rec = _Record(_Pending("test", apply_at, apply_at), "lightweight", apply_at, 0.0,
                  ReplanResult(NEW, 0.0, 0.0, tuple(diff_plans(OLD, NEW, MODEL, CLUSTER))))
    ctl.records.append(rec)
    seen: list[tuple[float, dict[str, str], set[str], int]] = []

    def look(_: object) -> None:
        phases = {gid: o.group.phase.value for gid, o in sorted(replay.objects.items())}
        seen.append((replay.loop.now_s, phases, set(replay.entry_ok), len(replay.held)))
        if replay.loop.now_s < 60:
            replay.loop.schedule(replay.loop.now_s + 0.25, PRIORITY_DECIDE, look, None)

    replay.loop.schedule(apply_at, PRIORITY_DECIDE, ctl._apply, rec)
    replay.loop.schedule(apply_at + 0.01, PRIORITY_DECIDE, look, None)
    replay.loop.run()
    return replay, ctl, rec, seen


def test_groups_turn_decode_only_once_the_new_prefill_group_serves() -> None:
    replay, ctl, rec, seen = run_rollout()
    first = seen[0]
    assert first[1] == {"c0": "prefill", "c1": "colocated", "c2": "colocated", "c3": "colocated"}
    assert first[2] == {"c1", "c2", "c3"}  # old routing over the groups keeping their role
    ready = next(e.time_s for e in ctl.log if e.kind == "ready" and e.detail.startswith("group c0"))
    assert ready > 5.0 + 2.0  # c0 drained its running sequences first
    flipped = [t for t, phases, _, _ in seen if phases["c1"] == "decode"]
    assert flipped and min(flipped) >= ready
    assert all(entry for _, _, entry, _ in seen)  # some group took requests at every look
    assert all(held == 0 for _, _, _, held in seen)
    assert {gid: o.group.phase for gid, o in replay.objects.items()} == {
        "c0": Phase.PREFILL, "c1": Phase.DECODE, "c2": Phase.DECODE, "c3": Phase.DECODE}
    assert rec.stage2 is None and not np.isnan(rec.ready_s)
    assert replay.finished == len(replay.req.arrival) and sum(replay.retries) == 0
