"""Tensor-parallel groups in the serving runtime: a worker is TP rank 0 driving follower processes (tiny Llama).

Same greedy tokens as TP=1 through WorkerCore (colocated, and prefill TP=2 -> decode TP=1 with the KV
gathered from the head shards, and TP=1 -> TP=2 with it scattered), caches released on every rank, role
flips without reloads, and no orphan processes after a stop or a kill -9 of the rank-0 worker.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from runtime_builders import child_pids, pid_alive, request, wait_gone  # noqa: E402
from tiny_llama import build_tiny_llama, reference_greedy  # noqa: E402

from thunderserve.plan import Group, Phase, Plan, Routing, Stage  # noqa: E402
from thunderserve.runtime.engine.base import DecodeInput  # noqa: E402
from thunderserve.runtime.launch import LocalLauncher, worker_specs  # noqa: E402
from thunderserve.runtime.launch.base import cuda_rank_devices, group_tp  # noqa: E402
from thunderserve.runtime.workers.codec import QuantizeKvCodec  # noqa: E402
from thunderserve.runtime.workers.core import WorkerCore  # noqa: E402
from thunderserve.runtime.workers.protocol import WorkerConfig  # noqa: E402
from thunderserve.runtime.workers.server import build_engine  # noqa: E402
from thunderserve.runtime.workers.tensor_parallel import TensorParallelEngine, TensorParallelKV  # noqa: E402

if not hasattr(pytest.importorskip("thunderserve.runtime.engine"), "load_engine"):
    pytest.skip("the model engine is not in this tree", allow_module_level=True)

PROMPTS = ["hello world how are you", "tell me a story", "the dog ran far away once upon a time", "good day"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tp") / "tiny-llama")


@pytest.fixture(scope="module")
def tp1(model_dir: Path) -> Any:
    return build_engine(str(model_dir))


@pytest.fixture(scope="module")
def tp2(model_dir: Path) -> Iterator[TensorParallelEngine]:
    engine = build_engine(str(model_dir), tp=2)
    assert isinstance(engine, TensorParallelEngine)
    try:
        yield engine
    finally:
        engine.close()
    assert not any(pid_alive(p) for p in engine.follower_pids)


def run_until_idle(core: WorkerCore, max_steps: int = 2000) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for _ in range(max_steps):
        if not core.has_work():
            break
        core.step()
        events += core.drain_events()
    return events + core.drain_events()


def tokens(events: list[dict[str, Any]], rid: str) -> list[int]:
    return [t for e in events if e["kind"] == "output" and e["request_id"] == rid for t in e["token_ids"]]


def _core(engine: Any, role: str, group: str = "g0", kv: dict[str, float] | None = None) -> WorkerCore:
    return WorkerCore(engine, WorkerConfig(group_id=group, role=Phase(role)), QuantizeKvCodec("none"),
                      kv_shares=kv)


def _colocated(engine: Any, max_tokens: int = 12) -> dict[str, list[int]]:
    core = _core(engine, "colocated")
    for i, p in enumerate(PROMPTS):
        core.submit(request(p, max_tokens=max_tokens, request_id=f"r{i}"))
    events = run_until_idle(core)
    return {f"r{i}": tokens(events, f"r{i}") for i in range(len(PROMPTS))}


def _disaggregated(prefill_engine: Any, decode_engine: Any, max_tokens: int = 12) -> dict[str, list[int]]:
    prefill = _core(prefill_engine, "prefill", "p0", kv={"d0": 1.0})
    decode = _core(decode_engine, "decode", "d0")
    for i, p in enumerate(PROMPTS):
        prefill.submit(request(p, max_tokens=max_tokens, request_id=f"r{i}"))
    events: list[dict[str, Any]] = []
    while prefill.has_work():
        for h in prefill.step().handoffs:
            decode.import_kv(h.request_id, h.meta, h.payload)
            prefill.handoff_finished(h.request_id, "d0", True)
        events += prefill.drain_events()
    events += run_until_idle(decode)
    return {f"r{i}": tokens(events, f"r{i}") for i in range(len(PROMPTS))}


def _plan(groups: list[tuple[str, str, list[list[str]]]], kv: dict[str, dict[str, float]] | None = None) -> Plan:
    """Groups of (id, phase, GPUs per stage) over the tiny model's 2 layers (split evenly across stages)."""
    gs = []
    for gid, phase, stage_gpus in groups:
        bounds = [0, 1, 2] if len(stage_gpus) == 2 else [0, 2]
        gs.append(Group(id=gid, phase=Phase(phase), stages=tuple(
            Stage(gpus=tuple(g), layers=(bounds[i], bounds[i + 1])) for i, g in enumerate(stage_gpus))))
    entry = [g[0] for g in groups if g[1] != "decode"]
    return Plan(model="tiny-llama", cluster="test", groups=tuple(gs),
                routing=Routing(entry={g: 1 / len(entry) for g in entry}, kv=kv or {}))


def test_worker_specs_run_tp_groups_unless_collapsed() -> None:
    plan = _plan([("c0", "colocated", [["n0:0", "n0:1"]]), ("c1", "colocated", [["n0:2", "n0:3"], ["n0:4"]]),
                  ("c2", "colocated", [["n0:5"]])])
    specs = {s.config.group_id: s for s in worker_specs(plan, "m")}
    assert (specs["c0"].tp, specs["c1"].tp, specs["c2"].tp) == (2, 1, 1)  # unequal stages: the smallest degree
    assert group_tp(plan.group("c1")) == 1
    assert {s.tp for s in worker_specs(plan, "m", collapse_tp=True)} == {1}
    ranks = cuda_rank_devices(plan, 4)
    assert ranks["c0"] == (("cuda:0",), ("cuda:1",)) and ranks["c1"] == (("cuda:2", "cuda:0"),)
    spec = {s.config.group_id: s for s in worker_specs(plan, "m", rank_devices=ranks)}["c0"]
    assert spec.rank_devices == (("cuda:0",), ("cuda:1",))


def test_tp2_colocated_worker_matches_tp1(tp1: Any, tp2: TensorParallelEngine, model_dir: Path) -> None:
    assert tp2.tp == 2 and len(tp2.follower_pids) == 1 and all(pid_alive(p) for p in tp2.follower_pids)
    expected = _colocated(tp1)
    assert _colocated(tp2) == expected
    assert expected["r1"] == reference_greedy(model_dir, tp1.encode(PROMPTS[1]), 12)
    gc.collect()
    assert tp2.cached_handles() == [[]]  # every finished request's cache was released on the follower too


def test_prefill_tp2_to_decode_tp1_and_back_give_the_same_tokens(tp1: Any, tp2: TensorParallelEngine) -> None:
    expected = _colocated(tp1)
    assert _disaggregated(tp2, tp1) == expected  # KV gathered from the ranks' head shards
    assert _disaggregated(tp1, tp2) == expected  # KV scattered by heads to the ranks
    gc.collect()
    assert tp2.cached_handles() == [[]]


def test_gathered_cache_has_full_heads_and_scatter_round_trips(tp1: Any, tp2: TensorParallelEngine) -> None:
    prompt = tp1.encode(PROMPTS[2])
    ref, got = tp1.prefill([prompt])[0], tp2.prefill([prompt])[0]
    assert isinstance(got.kv, TensorParallelKV) and got.kv.local.keys.shape[1] == 1  # one of 2 kv heads here
    assert got.kv.keys.shape == ref.kv.keys.shape and got.kv.num_tokens == len(prompt)
    assert float((got.kv.keys - ref.kv.keys).abs().max()) < 1e-4
    assert float((got.kv.values - ref.kv.values).abs().max()) < 1e-4
    tok = int(ref.logits.argmax())
    foreign = QuantizeKvCodec("none").decode(QuantizeKvCodec("none").encode(ref.kv))
    a = tp2.decode([DecodeInput(tok, foreign)])[0]
    b = tp1.decode([DecodeInput(tok, ref.kv)])[0]
    assert int(a.argmax()) == int(b.argmax()) and float((a - b).abs().max()) < 1e-3
    del ref, got, foreign
    gc.collect()
    assert tp2.cached_handles() == [[]]


def test_input_errors_keep_the_group_in_step_and_roles_flip_without_reload(tp1: Any,
                                                                           tp2: TensorParallelEngine) -> None:
    before = tp2.current_weights_tokens()
    assert before == tp2.rank_weights_tokens and len(set(before)) == 2
    with pytest.raises(ValueError, match="exceeds"):
        tp2.prefill([[5] * (tp2.max_context_tokens + 1)])  # every rank refuses it before any collective
    core = _core(tp2, "colocated")
    for role in ("prefill", "decode", "colocated"):
        core.set_role(role)
    core.submit(request(PROMPTS[0], max_tokens=8, request_id="x"))
    assert tokens(run_until_idle(core), "x") == _colocated(tp1, 8)["r0"]
    assert tp2.current_weights_tokens() == before and core.engine.weights_token == tp2.weights_token


@pytest.mark.slow
def test_launched_tp_groups_serve_and_leave_no_orphans(model_dir: Path) -> None:
    """prefill TP=1 -> decode PP=2 x TP=2 over processes; the worker's followers go with `stop`."""
    import asyncio

    from runtime_builders import run_request

    from thunderserve.runtime.router import Finished, Router

    plan = _plan([("p0", "prefill", [["n0:0"]]), ("d0", "decode", [["n0:1", "n0:2"], ["n0:3", "n0:4"]])],
                 kv={"p0": {"d0": 1.0}})
    launcher = LocalLauncher(ready_timeout_s=240)
    endpoints = launcher.start(worker_specs(plan, str(model_dir)))
    try:
        followers = child_pids(endpoints["d0"].pid)
        assert followers and all(pid_alive(p) for p in followers)

        async def use() -> None:
            router = Router(plan, {g: (e.host, e.control_port) for g, e in endpoints.items()})
            await router.start()
            try:
                for prompt in PROMPTS[:2]:
                    out = await run_request(router, request(prompt, max_tokens=10))
                    assert isinstance(out.terminal, Finished)
                    ids = build_engine(str(model_dir)).encode(prompt)
                    assert out.token_ids == reference_greedy(model_dir, ids, 10), prompt
            finally:
                await router.close(shutdown_workers=False)

        asyncio.run(use())
    finally:
        launcher.stop(timeout_s=15)
    assert wait_gone([*followers, *(e.pid for e in endpoints.values())]) == []


@pytest.mark.slow
def test_kill_9_of_the_rank0_worker_takes_its_followers_down(model_dir: Path) -> None:
    launcher = LocalLauncher(ready_timeout_s=240)
    endpoints = launcher.start(worker_specs(_plan([("c0", "colocated", [["n0:0", "n0:1"]])]), str(model_dir)))
    try:
        worker = endpoints["c0"].pid
        followers = child_pids(worker)
        assert followers
        os.kill(worker, signal.SIGKILL)
        assert wait_gone([worker, *followers], timeout_s=10) == []
    finally:
        launcher.stop(timeout_s=5)


def _crash_a_follower(model: str, out: Any) -> None:
    """In a fresh process (one TP group per process): kill rank 1, then every call fails fast and visibly."""
    engine = build_engine(model, tp=2)
    assert isinstance(engine, TensorParallelEngine)
    core = _core(engine, "colocated")
    core.submit(request(PROMPTS[0], max_tokens=4, request_id="before"))
    ok = len(tokens(run_until_idle(core), "before")) == 4
    follower = engine.follower_pids[0]
    os.kill(follower, signal.SIGKILL)
    t0 = time.monotonic()
    core.submit(request(PROMPTS[1], max_tokens=4, request_id="after"))
    try:  # the core raises rather than failing the request: its worker goes down and the router retries it
        run_until_idle(core)
        raised = "no error"
    except RuntimeError as exc:
        raised = str(exc)
    errors = [e for e in core.drain_events() if e["kind"] == "error"]
    try:
        engine.prefill([[5, 6]])
        later = "no error"
    except RuntimeError as exc:
        later = str(exc)
    out.put({"ok_before": ok, "raised": raised, "errors": len(errors), "broken": core.engine_broken(),
             "seconds": time.monotonic() - t0, "later": later, "follower_alive": pid_alive(follower)})
    engine.close()


@pytest.mark.slow
def test_a_dead_follower_takes_the_worker_down_fast_instead_of_hanging(model_dir: Path) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_crash_a_follower, args=(str(model_dir), out))
    proc.start()
    try:
        got = out.get(timeout=120)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    assert got["ok_before"] and not got["follower_alive"]
    assert "tensor-parallel group is down" in got["raised"] and got["errors"] == 0 and got["broken"], got
    assert got["seconds"] < 30 and "tensor-parallel group is down" in got["later"]
    assert proc.exitcode == 0, got
