"""Pipeline-parallel groups: stage engines chained in one worker, KV caches crossing layouts (tiny real Llama)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from runtime_builders import request, run_request  # noqa: E402
from tiny_llama import build_tiny_llama, reference_greedy  # noqa: E402

from thunderserve.plan import Group, Phase, Plan, Routing, Stage  # noqa: E402
from thunderserve.runtime.engine.base import DecodeInput  # noqa: E402
from thunderserve.runtime.router import Finished, Router, RouterConfig  # noqa: E402
from thunderserve.runtime.workers.codec import QuantizeKvCodec  # noqa: E402
from thunderserve.runtime.workers.pipeline import PipelineEngine, PipelineKV, load_pipeline  # noqa: E402
from thunderserve.runtime.workers.protocol import WorkerConfig  # noqa: E402
from thunderserve.runtime.workers.server import WorkerServer, build_engine  # noqa: E402

if not hasattr(pytest.importorskip("thunderserve.runtime.engine"), "load_engine"):
    pytest.skip("the model engine is not in this tree", allow_module_level=True)
pytest.importorskip("thunderserve.runtime.kv.quantize")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("pp") / "tiny-llama")


def _greedy(engine, prompt: list[int], n: int) -> list[int]:  # type: ignore[no-untyped-def]
    out = engine.prefill([prompt])[0]
    tok = int(out.logits.argmax())
    toks, kv = [tok], out.kv
    for _ in range(n - 1):
        tok = int(engine.decode([DecodeInput(tok, kv)])[0].argmax())
        toks.append(tok)
    return toks


def test_pipeline_equals_the_whole_model_and_accepts_foreign_caches(model_dir: Path) -> None:
    whole = build_engine(str(model_dir))
    pipe = load_pipeline(str(model_dir), [(0, 1, "cpu"), (1, 2, "cpu")])
    prompt = whole.encode("once upon a time the cat")
    assert _greedy(pipe, prompt, 10) == _greedy(whole, prompt, 10) == reference_greedy(model_dir, prompt, 10)[:10]

    res = pipe.prefill([prompt])[0]
    assert isinstance(res.kv, PipelineKV) and res.kv.keys.shape[0] == 2 and res.kv.num_tokens == len(prompt)
    codec = QuantizeKvCodec("none")
    first = int(res.logits.argmax())
    imported = codec.decode(codec.encode(res.kv))  # all layers in one tensor, as a decode group receives it
    nxt = whole.decode([DecodeInput(first, imported)])[0]
    foreign = codec.decode(codec.encode(whole.prefill([prompt])[0].kv))
    nxt_pipe = pipe.decode([DecodeInput(first, foreign)])[0]
    assert int(nxt.argmax()) == int(nxt_pipe.argmax()) == reference_greedy(model_dir, prompt, 2)[1]
    with pytest.raises(ValueError, match="consecutive"):
        PipelineEngine([pipe.stages[1], pipe.stages[0]])


async def _serve(model_dir: Path) -> None:
    def group(gid: str, phase: str, bounds: list[int]) -> Group:
        return Group(id=gid, phase=Phase(phase), stages=tuple(
            Stage(gpus=(f"n0:{gid}{i}",), layers=(bounds[i], bounds[i + 1])) for i in range(len(bounds) - 1)))

    plan = Plan(model="tiny-llama", cluster="test", groups=(
        group("p0", "prefill", [0, 1, 2]), group("p1", "prefill", [0, 2]),
        group("d0", "decode", [0, 2]), group("d1", "decode", [0, 1, 2])),
        routing=Routing(entry={"p0": 0.5, "p1": 0.5}, kv={"p0": {"d0": 1.0}, "p1": {"d1": 1.0}}))
    servers = {}
    for g in plan.groups:
        stages = tuple((s.layers[0], s.layers[1], "cpu") for s in g.stages) if g.pp > 1 else ()
        engine = build_engine(str(model_dir), "cpu", stages)
        servers[g.id] = WorkerServer(engine, WorkerConfig(group_id=g.id, role=g.phase), QuantizeKvCodec("none"))
        await servers[g.id].start()
    router = Router(plan, {g: ("127.0.0.1", s.control_port) for g, s in servers.items()},
                    RouterConfig(monitor_interval_s=0.05))
    await router.start()
    try:
        eng = servers["p1"].core.engine
        prompts = ["hello world how are you", "tell me a story", "the dog ran far away", "good day"]
        outs = await asyncio.gather(*[run_request(router, request(p, max_tokens=12)) for p in prompts])
        for p, out in zip(prompts, outs, strict=True):
            assert isinstance(out.terminal, Finished)
            assert out.token_ids == reference_greedy(model_dir, eng.encode(p), 12), p
        assert servers["d0"].core.generated_tokens_total > 0 and servers["d1"].core.generated_tokens_total > 0
    finally:
        await router.close()
        for s in servers.values():
            await s.stop()


def test_disaggregated_between_pipelined_and_single_stage_groups(model_dir: Path) -> None:
    asyncio.run(_serve(model_dir))
