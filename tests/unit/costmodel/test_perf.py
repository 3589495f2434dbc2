"""Cost model pinned on hand-computed cases (TOY GPU: 100 TFLOP/s at 50% efficiency, 1000 GB/s at 100%).

A step is the sum of its operations: linear layers (roofline), attention, element-wise kernels."""

from __future__ import annotations

import pytest

from builders import make_cluster, make_model
from thunderserve.costmodel import Compression, allreduce_time_s, compression_ratio, group_perf, kv_bytes
from thunderserve.costmodel.comm import ALLREDUCE_LATENCY_S
from thunderserve.costmodel.kv import kv_seconds_per_token
from thunderserve.spec.cluster import GBPS_TO_BYTES

FLOPS = 100e12 * 0.5
BW = 1000e9
PARAMS_PER_LAYER = 1024 * 1024 * 2 + 1024 * 1024 * 2 + 3 * 1024 * 4096  # q,o + k,v + gate,up,down
LM_HEAD = 1000 * 1024
# element-wise bytes per token and layer: norms + adds (10 x hidden), rotary on q and k, gated activation (3 x inter)
ELEMENTWISE_BYTES = 2 * (10 * 1024 + 2 * (8 + 8) * 128 + 3 * 4096)


def _single_gpu():  # type: ignore[no-untyped-def]
    cluster = make_cluster((("n0", "TOY", 1),))
    return group_perf(make_model(), [(cluster.gpus, 2)], cluster)


def test_dense_prefill_is_matmul_bound() -> None:
    perf = _single_gpu()
    tokens = 4096
    flops = tokens * 2 * PARAMS_PER_LAYER * 2 + 2 * LM_HEAD
    mem = 2 * PARAMS_PER_LAYER * 2 + LM_HEAD * 2
    assert flops / FLOPS > mem / BW
    attention = tokens**2 * 2 * 1024 * 2 / FLOPS  # causal: 4 x hidden x len²/2 per layer
    elementwise = 2 * tokens * ELEMENTWISE_BYTES / BW
    assert perf.prefill_latency_s([tokens]) == pytest.approx(flops / FLOPS + attention + elementwise, rel=1e-12)


def test_decode_is_bandwidth_bound() -> None:
    perf = _single_gpu()
    context = 1000
    mem = 2 * PARAMS_PER_LAYER * 2 + LM_HEAD * 2
    flops = 2 * PARAMS_PER_LAYER * 2 + 2 * LM_HEAD
    assert mem / BW > flops / FLOPS
    kv_read = context * (2 * 8 * 128 * 2) * 2 / BW  # decode attention reads the context's KV
    elementwise = 2 * ELEMENTWISE_BYTES / BW
    assert perf.decode_step_latency_s([context]) == pytest.approx(mem / BW + kv_read + elementwise, rel=1e-12)


def test_allreduce_over_a_slow_link() -> None:
    link = 1 * GBPS_TO_BYTES  # 1 Gbps between two nodes
    assert allreduce_time_s(2048, 2, link) == pytest.approx(2 * ALLREDUCE_LATENCY_S + 2048 / link)
    cluster = make_cluster((("a", "TOY", 1), ("b", "TOY", 1)), default_gbps=1)
    tp2 = group_perf(make_model(), [(cluster.gpus, 2)], cluster)
    one = _single_gpu()
    # two all-reduces per layer of batch x hidden x 2 bytes; compute/memory halve with TP=2
    expected_comm = 2 * 2 * allreduce_time_s(1 * 1024 * 2, 2, link)
    mem = 2 * PARAMS_PER_LAYER * 2 + LM_HEAD * 2 + 1000 * 8192
    elementwise = 2 * 2 * (10 * 1024 + 2 * (8 + 8) * 128 / 2 + 3 * 4096 / 2) / BW  # per GPU: sharded parts halve
    assert tp2.decode_step_latency_s([1000]) == pytest.approx(mem / (2 * BW) + expected_comm + elementwise,
                                                             rel=1e-12)
    assert tp2.decode_step_latency_s([1000]) > one.decode_step_latency_s([1000])


def test_a_mixed_step_costs_the_sum_of_its_parts() -> None:
    stage = _single_gpu().stages[0]
    decodes, context, chunk = 20, 20 * 1088, 490
    mixed = stage.step_time_s(decodes, context, chunk, chunk**2, decodes)
    # linear layers run once over all tokens; attention and element-wise terms add
    linear = stage.linear_time_s(decodes + chunk, decodes)
    attention = chunk**2 * 2 * 1024 * 2 / FLOPS + context * (2 * 8 * 128 * 2) * 2 / BW
    elementwise = 2 * (decodes + chunk) * ELEMENTWISE_BYTES / BW
    assert mixed == pytest.approx(linear + attention + elementwise, rel=1e-12)
    # the decodes' KV reads do not hide under the chunk's compute
    assert mixed > stage.prefill_time_s(chunk, chunk**2)
    assert mixed > stage.decode_time_s(decodes, context)


def test_kv_capacity_from_memory() -> None:
    perf = _single_gpu()
    used = (2 * PARAMS_PER_LAYER * 2 + 2 * LM_HEAD * 2) + 4096 * (4 * 1024 + 2 * 4096) * 2 + 1e9
    assert perf.kv_capacity_tokens == int((40e9 * 0.9 - used) // (2 * 8 * 128 * 2 * 2))


def test_gqa_and_compressed_kv_bytes() -> None:
    m = make_model(num_kv_heads=2)  # 2 KV heads of dim 128 over 2 layers, fp16
    assert kv_bytes(m, 10) == 10 * 2 * 2 * 128 * 2 * 2
    # per channel of a 512-token prompt: 1 sink token in 16 bits for K and V (4 bytes); 511 tokens of K and V
    # codes; K scale + zero per 128-token block (4 blocks); V scale + zero per token and 64-channel group.
    # int4 also sends the 128 most recent tokens in 16 bits (4 bytes each), leaving 383 on the grid, with its
    # key scale + zero per 64-token block (6 blocks).
    assert compression_ratio(Compression.INT4) == pytest.approx((4 * 129 + 383 + 6 * 4 + 383 * 4 / 64) / 2048)
    assert compression_ratio("int8") == pytest.approx((4 + 1022 + 4 * 8 + 511 * 8 / 64) / 2048)
    assert 1 / compression_ratio("int4", num_tokens=2048) > 3.0  # the coding workload's mean prompt
    assert compression_ratio("int4", num_tokens=37) == pytest.approx(1.0)  # a short prompt: all 16-bit
    assert kv_bytes(m, 10, "int4") == pytest.approx(kv_bytes(m, 10) * compression_ratio("int4"))


def test_kv_transfer_uses_slowest_link_and_zero_is_infinite() -> None:
    m = make_model()
    c = make_cluster((("a", "TOY", 1), ("b", "TOY", 1), ("c", "TOY", 1)), default_gbps=8,
                     links=[{"between": ["a", "c"], "gbps": 0}])
    a, b, cc = c.gpus
    per_token = kv_seconds_per_token(m, [([a], 2)], [b], c)
    assert per_token == pytest.approx(m.kv_bytes_per_token / (8 * GBPS_TO_BYTES))
    assert kv_seconds_per_token(m, [([a], 2)], [b], c, "int4") == pytest.approx(per_token * compression_ratio("int4"))
    assert kv_seconds_per_token(m, [([a], 2)], [cc], c) == float("inf")


def test_pipeline_adds_stage_times_and_sends() -> None:
    c = make_cluster((("a", "TOY", 1), ("b", "TOY", 1)), default_gbps=8)
    m = make_model()
    pp = group_perf(m, [([c.gpus[0]], 1), ([c.gpus[1]], 1)], c)
    assert pp.prefill_latency_s([100]) == pytest.approx(
        pp.stages[0].prefill_time_s(100, 100**2) + pp.stages[1].prefill_time_s(100, 100**2)
        + 30e-6 + 100 * 1024 * 2 / (8 * GBPS_TO_BYTES))
    assert pp.prefill_stage_max_s(100, 100**2) < pp.prefill_latency_s([100])
