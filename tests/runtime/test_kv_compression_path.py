"""The disaggregated path through the production codec (runtime.kv.quantize) at every compression level."""

from __future__ import annotations

import asyncio

import pytest
from runtime_builders import fake_deployment, pd_plan, request, run_request

from thunderserve.runtime.router import Finished
from thunderserve.runtime.workers.codec import QuantizeKvCodec

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("compression", ["none", "int8", "int4"])
async def test_quantized_transfer_keeps_the_fake_models_output(compression: str) -> None:
    # the fake engine's cache rows are constant groups of token ids, which every level reproduces exactly
    prompt = "compressed transfer " * 4
    async with fake_deployment(pd_plan(), codec=QuantizeKvCodec(compression)) as dep:
        out = await run_request(dep.router, request(prompt, max_tokens=12))
        assert isinstance(out.terminal, Finished)
        assert out.token_ids == dep.engines["p0"].greedy(list(prompt.encode()), 12)
        p0 = dep.servers["p0"]
        for _ in range(100):
            if p0.kv_bytes_sent.get("d0"):
                break
            await asyncio.sleep(0.01)
        sent = p0.kv_bytes_sent["d0"]
        raw = 2 * 2 * len(prompt) * 4 * 4  # K and V, 2 layers, prompt tokens, head_dim 4, float32
        assert sent < raw if compression != "none" else sent >= raw
