"""WorkerCore state machine on the fake engine: lifecycle, roles, routing, backpressure, failures."""

from __future__ import annotations

from typing import Any

import pytest
from runtime_builders import request

from thunderserve.plan import Phase
from thunderserve.runtime.fakes import FAKE_EOS, FakeEngine, RawKvCodec
from thunderserve.runtime.workers.core import WorkerCore
from thunderserve.runtime.workers.protocol import WorkerConfig


def make_core(role: str = "colocated", kv: dict[str, float] | None = None, engine: FakeEngine | None = None,
              **cfg: Any) -> WorkerCore:
    config = WorkerConfig(group_id=cfg.pop("group_id", "g0"), role=Phase(role), **cfg)
    return WorkerCore(engine or FakeEngine(), config, RawKvCodec(), kv_shares=kv)


def run_until_idle(core: WorkerCore, max_steps: int = 2000) -> list[dict]:
    events: list[dict] = []
    for _ in range(max_steps):
        if not core.has_work():
            break
        core.step()
        events += core.drain_events()
    events += core.drain_events()
    return events


def outputs(events: list[dict], rid: str) -> list[dict]:
    return [e for e in events if e["kind"] == "output" and e["request_id"] == rid]


def tokens(events: list[dict], rid: str) -> list[int]:
    return [t for e in outputs(events, rid) for t in e["token_ids"]]


def test_colocated_greedy_matches_the_model() -> None:
    core = make_core()
    core.submit(request("hello", max_tokens=12, request_id="r1"))
    events = run_until_idle(core)
    assert events[0] == {"kind": "accepted", "request_id": "r1", "prompt_tokens": 5, "max_tokens": 12}
    assert tokens(events, "r1") == core.engine.greedy(list(b"hello"), 12)
    outs = outputs(events, "r1")
    assert [o["index"] for o in outs] == list(range(12))
    assert outs[-1]["finish_reason"] == "length" and all(o["finish_reason"] is None for o in outs[:-1])
    assert core.kv_used_tokens() == 0


def test_prefill_hands_off_and_decode_continues_identically() -> None:
    prefill = make_core("prefill", kv={"d0": 1.0}, group_id="p0")
    decode = make_core("decode", group_id="d0")
    prefill.submit(request("disaggregated", max_tokens=9, request_id="r1"))
    result = prefill.step()
    assert result.prefilled == 1 and len(result.handoffs) == 1
    h = result.handoffs[0]
    assert h.dest_group == "d0" and h.meta["num_generated"] == 1
    assert prefill.kv_used_tokens() == len(b"disaggregated")  # held until the decode side acknowledges
    ev_p = prefill.drain_events()
    assert [e["kind"] for e in ev_p] == ["accepted", "output", "handoff"]
    decode.import_kv(h.request_id, h.meta, h.payload)
    prefill.handoff_finished("r1", "d0", ok=True)
    assert prefill.kv_used_tokens() == 0
    assert prefill.drain_events() == [{"kind": "handoff", "request_id": "r1", "to": "d0", "state": "done"}]
    ev_d = run_until_idle(decode)
    assert tokens(ev_p, "r1") + tokens(ev_d, "r1") == prefill.engine.greedy(list(b"disaggregated"), 9)
    assert outputs(ev_d, "r1")[0]["index"] == 1


def test_failed_handoff_fails_the_request_and_releases_memory() -> None:
    core = make_core("prefill", kv={"d0": 1.0})
    core.submit(request("abc", max_tokens=4, request_id="r1"))
    core.step()
    core.drain_events()
    core.handoff_finished("r1", "d0", ok=False, error="peer closed")
    (ev,) = core.drain_events()
    assert ev["kind"] == "error" and "to d0 failed: peer closed" in ev["message"]
    assert core.kv_used_tokens() == 0


def test_role_flip_changes_new_work_only_and_keeps_weights() -> None:
    engine = FakeEngine()
    core = make_core("prefill", kv={"d0": 1.0}, engine=engine)
    token = engine.weights_token
    core.submit(request("one", max_tokens=5, request_id="r1"))
    assert core.step().handoffs  # prefill role: shipped
    core.set_role(Phase.COLOCATED)
    core.submit(request("two", max_tokens=5, request_id="r2"))
    assert not core.step().handoffs  # colocated: kept and decoded here
    events = run_until_idle(core)
    assert len(tokens(events, "r2")) == 5 and outputs(events, "r2")[-1]["finish_reason"] == "length"
    core.set_role("decode")
    core.submit(request("three", request_id="r3"))
    (ev,) = [e for e in core.drain_events() if e["request_id"] == "r3"]
    assert ev["kind"] == "error" and "decode role" in ev["message"]
    assert core.engine is engine and engine.weights_token == token
    assert core.state(pid=1).role == "decode" and core.state(pid=1).weights_token == token


def test_kv_routing_follows_shares_updates_and_down_groups() -> None:
    core = make_core("prefill", kv={"d0": 0.5, "d1": 0.5})

    def dests(n: int) -> list[str]:
        out = []
        for i in range(n):
            core.submit(request("x", max_tokens=3, request_id=f"r{len(core.drain_events())}-{i}-{id(out)}"))
            out += [h.dest_group for h in core.step().handoffs]
        return out

    assert sorted(dests(4)) == ["d0", "d0", "d1", "d1"]
    core.set_kv_routing({"d1": 1.0})
    assert dests(3) == ["d1"] * 3
    core.set_kv_routing({"d0": 0.5, "d1": 0.5}, down=["d1"])
    assert dests(3) == ["d0"] * 3
    core.set_kv_routing(down=["d0", "d1"])  # no live destination: decode locally rather than fail
    core.submit(request("y", max_tokens=3, request_id="local"))
    assert core.step().handoffs == []
    assert outputs(run_until_idle(core), "local")[-1]["finish_reason"] == "length"


def test_prefill_batches_follow_the_shared_policy() -> None:
    engine = FakeEngine()
    core = make_core(engine=engine, prefill_token_budget=10)
    for i in range(5):
        core.submit(request("abcd", max_tokens=2, request_id=f"r{i}"))  # 4 tokens each
    core.step()
    assert engine.prefill_calls == [2]  # 4 + 4 <= 10 < 12: select_prefill_batch takes two
    run_until_idle(core)
    assert engine.prefill_calls == [2, 2, 1]


def test_backpressure_waits_for_kv_memory_and_never_drops() -> None:
    engine = FakeEngine()
    core = make_core(engine=engine, kv_capacity_tokens=30)  # each request reserves 10 + 10 tokens
    for i in range(4):
        core.submit(request("0123456789", max_tokens=10, request_id=f"r{i}"))
    events = run_until_idle(core)
    assert max(engine.decode_calls) == 1  # never two sequences in the batch at once
    for i in range(4):
        assert tokens(events, f"r{i}") == engine.greedy(list(b"0123456789"), 10)
    assert core.kv_used_tokens() == 0 and not core.has_work()


def test_invalid_requests_are_rejected_with_the_field() -> None:
    core = make_core()
    core.submit(request("", request_id="empty"))
    core.submit(request("x" * 500, max_tokens=100, request_id="long"))
    core.submit(request("x", max_tokens=None, request_id="fill"))
    core.submit(request(None, request_id="msgs", messages=()))
    ev = {e["request_id"]: e for e in core.drain_events()}
    assert ev["empty"]["kind"] == "rejected" and ev["empty"]["param"] == "prompt"
    assert ev["long"]["code"] == "context_length_exceeded" and "maximum context length is 512" in ev["long"]["message"]
    assert ev["fill"] == {"kind": "accepted", "request_id": "fill", "prompt_tokens": 1, "max_tokens": 511}
    assert ev["msgs"]["param"] == "messages"


def test_stop_strings_and_eos_end_the_output() -> None:
    engine = FakeEngine()
    ref = engine.decode_text(engine.greedy(list(b"hello"), 20))
    stop = ref[5:7]
    core = make_core(engine=engine)
    core.submit(request("hello", max_tokens=20, stop=[stop], request_id="r1"))
    events = run_until_idle(core)
    text = "".join(o["text"] for o in outputs(events, "r1"))
    assert text == ref[: ref.find(stop)] and outputs(events, "r1")[-1]["finish_reason"] == "stop"

    eos_core = make_core(engine=FakeEngine(eos_every=8))
    eos_core.submit(request("hello", max_tokens=20, request_id="r2"))
    outs = outputs(run_until_idle(eos_core), "r2")
    assert outs[-1]["token_ids"] == [FAKE_EOS] and outs[-1]["finish_reason"] == "stop" and len(outs) == 4


def test_seeded_sampling_is_identical_split_or_not() -> None:
    def colocated(seed: int) -> list[int]:
        core = make_core(engine=FakeEngine(logit_spread=0.3))
        core.submit(request("seed me", max_tokens=12, temperature=1.0, seed=seed, request_id="r"))
        return tokens(run_until_idle(core), "r")

    prefill = make_core("prefill", kv={"d0": 1.0}, engine=FakeEngine(logit_spread=0.3))
    decode = make_core("decode", engine=FakeEngine(logit_spread=0.3))
    prefill.submit(request("seed me", max_tokens=12, temperature=1.0, seed=7, request_id="r"))
    h = prefill.step().handoffs[0]
    decode.import_kv("r", h.meta, h.payload)
    split = tokens(prefill.drain_events(), "r") + tokens(run_until_idle(decode), "r")
    assert split == colocated(7)
    assert colocated(7) != colocated(8)


def test_cancel_and_engine_failure_release_everything() -> None:
    class Broken(FakeEngine):
        def decode(self, inputs):  # type: ignore[no-untyped-def]
            raise RuntimeError("device lost")

    core = make_core()
    core.submit(request("abc", max_tokens=50, request_id="r1"))
    core.step()
    assert core.cancel("r1") and core.kv_used_tokens() == 0 and not core.has_work()
    broken = make_core(engine=Broken())
    broken.submit(request("abc", max_tokens=5, request_id="r2"))
    events = run_until_idle(broken)
    assert events[-1]["kind"] == "error" and "device lost" in events[-1]["message"]
    assert broken.kv_used_tokens() == 0


@pytest.mark.parametrize("reserve", [100, 10])
def test_import_refuses_a_cache_that_can_never_fit(reserve: int) -> None:
    core = make_core("decode", kv_capacity_tokens=50)
    meta = {"prompt_tokens": reserve, "max_tokens": 0, "seed": 0, "last_token": 97, "num_generated": 1,
            "text_ids": [97], "emitted_chars": 1,
            "sampling": {"max_tokens": 0, "temperature": 0.0, "top_p": 1.0, "seed": None, "stop": []}}
    payload = RawKvCodec().encode(FakeEngine().prefill([[97] * 3])[0].kv)
    if reserve > 50:
        with pytest.raises(ValueError, match="needs 100 KV tokens"):
            core.import_kv("r", meta, payload)
    else:
        core.import_kv("r", meta, payload)
        assert core.state(0).waiting_decode == 1


def test_a_failing_prompt_fails_alone_and_bad_token_ids_are_rejected() -> None:
    engine = FakeEngine(poison_token=ord("!"))
    core = make_core(engine=engine)
    for i, prompt in enumerate(["ok one", "bad!", "ok two"]):
        core.submit(request(prompt, max_tokens=3, request_id=f"r{i}"))
    core.submit(request(None, prompt_ids=(104, 9999), request_id="ids"))
    events = run_until_idle(core)
    ids_ev = next(e for e in events if e["request_id"] == "ids")
    assert ids_ev["kind"] == "rejected" and "9999" in ids_ev["message"] and ids_ev["param"] == "prompt"
    assert engine.prefill_calls[0] == 3  # batched first, then retried one by one
    assert next(e for e in events if e["request_id"] == "r1" and e["kind"] == "error")
    assert tokens(events, "r0") == engine.greedy(list(b"ok one"), 3)
    assert tokens(events, "r2") == engine.greedy(list(b"ok two"), 3)
