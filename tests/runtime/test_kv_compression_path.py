"""The disaggregated path through the production codec (runtime.kv.quantize) at every compression level."""

from __future__ import annotations

import asyncio

import pytest
from runtime_builders import fake_deployment, pd_plan, request, run_request

from thunderserve.runtime.engine.base import DecodeInput
from thunderserve.runtime.fakes import FakeEngine
from thunderserve.runtime.router import Finished
from thunderserve.runtime.workers.codec import QuantizeKvCodec

pytestmark = pytest.mark.anyio


def continuation_after_codec(codec: QuantizeKvCodec, prompt: list[int], max_tokens: int) -> list[int]:
    """The fake model's greedy tokens when its prefill cache goes through `codec` before decoding."""
    engine = FakeEngine()
    res = engine.prefill([prompt])[0]
    kv = codec.decode(codec.encode(res.kv))
    out = [int(res.logits.argmax())]
    while len(out) < max_tokens:
        out.append(int(engine.decode([DecodeInput(out[-1], kv)])[0].argmax()))
    return out


@pytest.mark.parametrize("compression", ["none", "int8", "int4"])
async def test_quantized_transfer_keeps_the_fake_models_output(compression: str) -> None:
    # The fake engine's cache holds token ids (32..116 here): none and int8 (a key channel's step < 1) bring them
    # back exactly, so the output is the fake's own greedy continuation. int4 keys are grouped per channel
    # along the tokens (a step of ~6 ids), but int4 keeps the most recent KV_RESIDUAL_TOKENS in 16 bits, which
    # is what the fake continues from: its output is unchanged too. The prompt is longer than that window, so
    # its older tokens do go through 4 bits; the deployment must produce exactly what the dequantised cache gives.
    prompt = "compressed transfer " * 10
    codec = QuantizeKvCodec(compression)
    async with fake_deployment(pd_plan(), codec=codec) as dep:
        out = await run_request(dep.router, request(prompt, max_tokens=12))
        assert isinstance(out.terminal, Finished)
        want = dep.engines["p0"].greedy(list(prompt.encode()), 12)
        assert out.token_ids == continuation_after_codec(codec, list(prompt.encode()), 12)
        assert out.token_ids == want
        p0 = dep.servers["p0"]
        for _ in range(100):
            if p0.kv_bytes_sent.get("d0"):
                break
            await asyncio.sleep(0.01)
        sent = p0.kv_bytes_sent["d0"]
        raw = 2 * 2 * len(prompt) * 4 * 4  # K and V, 2 layers, prompt tokens, head_dim 4, float32
        assert sent < raw if compression != "none" else sent >= raw
