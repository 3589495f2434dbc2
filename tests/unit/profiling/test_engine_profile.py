"""Engine profiler: grid coverage, warm-up/repeat/median logic on a fake engine and clock; profile file contract."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from thunderserve.costmodel.fit import PassKind
from thunderserve.errors import SpecError
from thunderserve.profiling.engine_profile import (
    ProfileGrid,
    Timer,
    profile_engine,
    profile_engine_shared,
    profile_kv,
)
from thunderserve.profiling.microbench import cpu_name, measure_peaks, memory_gb
from thunderserve.profiling.schema import DeviceInfo, EngineProfile, dump_profile, load_profile, parse_profile
from thunderserve.runtime.engine.base import DecodeInput, KVCache, PrefillResult
from thunderserve.spec import load_model

LAYERS, HEADS, HEAD_DIM = 2, 2, 4


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostEngine:
    """Advances a fake clock by a known cost per call: prefill 1 ms + 10 us/token, decode 2 ms + 1 us/ctx token."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.prefill_batches: list[list[int]] = []
        self.decode_batches: list[list[int]] = []

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        self.prefill_batches.append([len(p) for p in prompts])
        self.clock.now += 1e-3 + 10e-6 * sum(len(p) for p in prompts)
        return [PrefillResult(torch.zeros(8), KVCache(torch.rand(LAYERS, HEADS, len(p), HEAD_DIM),
                                                      torch.rand(LAYERS, HEADS, len(p), HEAD_DIM))) for p in prompts]

    def decode(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]:
        self.decode_batches.append([i.kv.num_tokens for i in inputs])
        self.clock.now += 2e-3 + 1e-6 * sum(i.kv.num_tokens for i in inputs)
        for i in inputs:
            i.kv.keys = torch.cat([i.kv.keys, torch.zeros(LAYERS, HEADS, 1, HEAD_DIM)], dim=2)
            i.kv.values = torch.cat([i.kv.values, torch.zeros(LAYERS, HEADS, 1, HEAD_DIM)], dim=2)
        return [torch.zeros(8) for _ in inputs]


GRID = ProfileGrid(prefill_batch_sizes=(1, 3), prompt_tokens=(8, 32), decode_batch_sizes=(2,), context_tokens=(16, 40),
                   kv_tokens=(12,), warmup=2, repeats=3)


def test_prefill_and_decode_grid_with_warmup_repeats_and_medians() -> None:
    clock = FakeClock()
    engine = CostEngine(clock)
    steps: list[str] = []
    ms = profile_engine(engine, GRID, vocab_size=1000, timer=Timer(clock=clock), on_step=steps.append)  # type: ignore[arg-type]
    assert len(ms) == len(steps) == 4 + 2
    prefill = {(m.batch_size, m.tokens): m for m in ms if m.phase is PassKind.PREFILL}
    assert set(prefill) == {(1, 8), (1, 32), (3, 8), (3, 32)}
    assert prefill[(3, 32)].latency_s == pytest.approx(1e-3 + 10e-6 * 96)
    assert len(prefill[(3, 32)].samples_s) == 3
    # 2 warm-up + 3 timed calls per prefill shape, then one setup prefill of the longest context
    assert engine.prefill_batches[:5] == [[8]] * 5 and engine.prefill_batches[-1] == [40]
    decode = [m for m in ms if m.phase is PassKind.DECODE]
    assert [(m.batch_size, m.tokens) for m in decode] == [(2, 16), (2, 40)]
    # context grows by one per call: timed calls see 16+2, 16+3, 16+4 tokens; the median is the middle one
    assert decode[0].latency_s == pytest.approx(2e-3 + 1e-6 * 2 * 19)
    assert engine.decode_batches[0] == [16, 16]


def test_kv_codec_cost() -> None:
    clock = FakeClock()
    engine = CostEngine(clock)

    class Half:
        def encode(self, kv: KVCache) -> bytes:
            clock.now += 5e-4
            return kv.keys.half().numpy().tobytes() + kv.values.half().numpy().tobytes()

        def decode(self, data: bytes) -> KVCache:
            clock.now += 2e-4
            return KVCache(torch.zeros(1), torch.zeros(1))

    out = profile_kv(engine, {"fp16": Half()}, GRID, 1000, timer=Timer(clock=clock))  # type: ignore[arg-type]
    (m,) = out
    assert m.method == "fp16" and m.tokens == 12
    assert m.raw_bytes == 2 * LAYERS * HEADS * 12 * HEAD_DIM * 4 and m.encoded_bytes == m.raw_bytes // 2
    assert m.encode_s == pytest.approx(5e-4) and m.decode_s == pytest.approx(2e-4)


def test_grid_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="prompt_tokens must be positive"):
        ProfileGrid(prompt_tokens=(0,))
    with pytest.raises(ValueError, match="repeats"):
        ProfileGrid(repeats=0)


def test_microbenchmark_reports_positive_peaks() -> None:
    peaks = measure_peaks(torch.device("cpu"), torch.float32, matmul_sizes=(64, 128), copy_bytes=2**20, repeats=2)
    assert peaks.peak_tflops > 0 and peaks.memory_bandwidth_gbs > 0
    assert cpu_name() and memory_gb(torch.device("cpu")) > 0


def _profile() -> EngineProfile:
    device = DeviceInfo(kind="cpu", name="Test CPU", gpu_type="CPU", threads=2, torch_version="x", dtype="float32",
                        peak_tflops=0.2, memory_bandwidth_gbs=40.0, memory_gb=16.0)
    model = load_model("smollm2-135m").model_copy(update={"dtype_bytes": 4})
    clock = FakeClock()
    ms = profile_engine(CostEngine(clock), GRID, 1000, timer=Timer(clock=clock))  # type: ignore[arg-type]
    return EngineProfile(device=device, model=model, engine="fake", warmup=2, repeats=3, measurements=tuple(ms))


def test_profile_file_round_trip(tmp_path: Path) -> None:
    prof = _profile()
    path = tmp_path / "profile.json"
    path.write_text(dump_profile(prof))
    assert load_profile(path) == prof
    spec = prof.device_spec()
    assert spec.name == "CPU" and spec.fp16_tflops == 0.2 and spec.memory_bandwidth_gbs == 40.0


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d["measurements"][0].update(latency_s=0), r"measurements\.0\.latency_s: Input should be greater than 0"),
    (lambda d: d["measurements"][1].update(latency_s=-2.0), r"measurements\.1\.latency_s: Input should be greater"),
    (lambda d: d["device"].update(peak_tflops=float("nan")), r"device\.peak_tflops: Input should be a finite number"),
    (lambda d: d["device"].pop("memory_bandwidth_gbs"), r"device\.memory_bandwidth_gbs: Field required"),
    (lambda d: d.update(measurements=[]), r"measurements: Tuple should have at least 1 item"),
    (lambda d: d.update(format="thunderserve-calibration/1"), r"format: not a thunderserve profile"),
])
def test_bad_profiles_name_the_field(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(dump_profile(_profile()))
    mutate(data)
    with pytest.raises(SpecError, match=rf"^p\.json: {message}"):
        parse_profile(json.dumps(data), "p.json")


def test_empty_and_malformed_profile_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^p\.json: empty file"):
        parse_profile("  \n", "p.json")
    with pytest.raises(SpecError, match=r"^p\.json: malformed JSON at line 1"):
        parse_profile("{", "p.json")
    with pytest.raises(SpecError, match=r"^p\.json: expected a JSON object"):
        parse_profile("[]", "p.json")
    with pytest.raises(SpecError, match=r"file not found"):
        load_profile(tmp_path / "missing.json")


def test_run_profile_on_the_fake_engine_detects_dtype_and_device() -> None:
    from thunderserve.profiling.run import run_profile
    from thunderserve.runtime.fakes import FakeEngine

    grid = ProfileGrid(prefill_batch_sizes=(1, 2), prompt_tokens=(4, 8), decode_batch_sizes=(1, 2),
                       context_tokens=(8,), kv_tokens=(8,), warmup=0, repeats=1)
    steps: list[str] = []
    prof = run_profile("smollm2", "cpu", grid, engine=FakeEngine(), peak_sizes=(32,), on_step=steps.append)
    assert prof.model.name == "smollm2-135m" and prof.model.dtype_bytes == 4  # the fake engine keeps float32 KV
    assert prof.device.kind == "cpu" and prof.device.gpu_type == "CPU" and prof.device.dtype == "float32"
    assert prof.device.threads >= 1 and prof.device.peak_tflops > 0
    assert len(prof.measurements) == 6 and steps[:2] == ["engine loaded", "device peaks"]
    assert all(m.latency_s > 0 for m in prof.measurements)
    with pytest.raises(SpecError, match=r"^--device: unknown device 'tpu'"):
        run_profile("smollm2", "tpu", grid, engine=FakeEngine())


class FakeNeighbours:
    """Contention seam for the profiler: while busy, the cost engine runs `slowdown` times slower."""

    def __init__(self, engine: SlowableEngine) -> None:
        self.engine = engine
        self.count = 1
        self.calls: list[bool] = []

    def set_busy(self, busy: bool) -> None:
        self.calls.append(busy)
        self.engine.factor = 1.5 if busy else 1.0


class SlowableEngine(CostEngine):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.factor = 1.0

    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PrefillResult]:
        t0 = self.clock.now
        out = super().prefill(prompts)
        self.clock.now = t0 + (self.clock.now - t0) * self.factor
        return out

    def decode(self, inputs: Sequence[DecodeInput]) -> list[torch.Tensor]:
        t0 = self.clock.now
        out = super().decode(inputs)
        self.clock.now = t0 + (self.clock.now - t0) * self.factor
        return out


def test_shared_profile_measures_every_shape_alone_then_with_busy_neighbours() -> None:
    clock = FakeClock()
    engine = SlowableEngine(clock)
    busy = FakeNeighbours(engine)
    steps: list[str] = []
    alone, shared = profile_engine_shared(engine, GRID, 1000, busy, timer=Timer(clock=clock),  # type: ignore[arg-type]
                                          on_step=steps.append)
    assert [m.shape for m in alone] == [m.shape for m in shared] and len(alone) == len(steps) == 6
    assert busy.calls[:3] == [False, True, False] and busy.calls[-1] is False  # left paused
    for a, s in zip(alone, shared, strict=True):
        assert s.latency_s == pytest.approx(1.5 * a.latency_s)
    # the alone half is exactly what profile_engine measures (fresh decode caches per measurement)
    clock2 = FakeClock()
    plain = profile_engine(CostEngine(clock2), GRID, 1000, timer=Timer(clock=clock2))  # type: ignore[arg-type]
    assert [(m.shape, m.latency_s) for m in plain] == [(m.shape, pytest.approx(m.latency_s)) for m in alone]


def _shared_profile() -> EngineProfile:
    clock = FakeClock()
    engine = SlowableEngine(clock)
    alone, shared = profile_engine_shared(engine, GRID, 1000, FakeNeighbours(engine),  # type: ignore[arg-type]
                                          timer=Timer(clock=clock))
    return _profile().model_copy(update={"measurements": tuple(alone), "shared_measurements": tuple(shared),
                                         "neighbours": 1})


def test_samples_blend_alone_and_shared_latencies_by_neighbour_busy_fraction(tmp_path: Path) -> None:
    prof = _shared_profile()
    path = tmp_path / "p.json"
    path.write_text(dump_profile(prof))
    assert load_profile(path) == prof
    alone = {(s.phase, s.batch_size, s.tokens): s.measured_s for s in prof.samples()}
    assert alone == {m.shape: m.latency_s for m in prof.measurements}  # default: alone
    blended = prof.samples({PassKind.PREFILL: 1.0, PassKind.DECODE: 0.25})
    for s in blended:
        t = alone[(s.phase, s.batch_size, s.tokens)]
        assert s.measured_s == pytest.approx(t * (1.5 if s.phase is PassKind.PREFILL else 1.125))
    with pytest.raises(ValueError, match=r"neighbour_busy\[decode\] must be in \[0, 1\]"):
        prof.samples({PassKind.DECODE: 1.5})


def test_shared_measurements_must_match_alone_shapes_and_name_neighbours() -> None:
    data = json.loads(dump_profile(_shared_profile()))
    no_neighbours = {**data, "neighbours": 0}
    with pytest.raises(SpecError, match=r"^p\.json: .*shared_measurements need at least 1 neighbour"):
        parse_profile(json.dumps(no_neighbours), "p.json")
    data["shared_measurements"][0]["batch_size"] = 7
    with pytest.raises(SpecError, match=r"^p\.json: .*prefill b=7 tokens=8 was not measured alone"):
        parse_profile(json.dumps(data), "p.json")


def test_neighbours_are_validated() -> None:
    from thunderserve.profiling.neighbours import Neighbours
    from thunderserve.profiling.run import run_profile
    from thunderserve.runtime.fakes import FakeEngine

    with pytest.raises(SpecError, match=r"^--neighbours: must be at least 0"):
        run_profile("fake", "cpu", ProfileGrid(), engine=FakeEngine(), neighbours=-1)
    with pytest.raises(ValueError, match="count must be >= 0"):
        Neighbours("fake", -1, threads=1)


def test_kv_transfer_over_the_runtime_transport_on_loopback() -> None:
    from thunderserve.profiling.kv_link import measure_transfer_s

    out = measure_transfer_s({"small": b"x" * 1000, "big": b"y" * 2_000_000}, warmup=1, repeats=2)
    assert set(out) == {"small", "big"} and all(t > 0 for t in out.values())
    assert measure_transfer_s({}) == {}
    with pytest.raises(ValueError, match="repeats must be positive"):
        measure_transfer_s({"a": b"a"}, repeats=0)


def test_kv_path_gives_the_link_bandwidth_the_simulator_uses() -> None:
    from thunderserve.costmodel.kv import kv_bytes

    clock = FakeClock()
    engine = CostEngine(clock)

    class Raw:
        def encode(self, kv: KVCache) -> bytes:
            clock.now += 1e-3
            return kv.keys.numpy().tobytes() + kv.values.numpy().tobytes()

        def decode(self, data: bytes) -> KVCache:
            clock.now += 5e-4
            return KVCache(torch.zeros(1), torch.zeros(1))

    shipped: list[dict[str, int]] = []

    def transfer(blobs: dict[str, bytes]) -> dict[str, float]:
        shipped.append({k: len(v) for k, v in blobs.items()})
        return {k: 2.5e-3 for k in blobs}

    (m,) = profile_kv(engine, {"none": Raw()}, GRID, 1000, timer=Timer(clock=clock),  # type: ignore[arg-type]
                      transfer=transfer)
    assert shipped == [{"none": m.raw_bytes}] and m.transfer_s == pytest.approx(2.5e-3)
    assert m.path_s == pytest.approx(1e-3 + 2.5e-3 + 5e-4)
    prof = _profile().model_copy(update={"kv": (m,)})
    gbs = prof.kv_link_gbs("none")
    assert gbs == pytest.approx(kv_bytes(prof.model, m.tokens) / 4e-3 / 1e9)
    assert prof.kv_link_gbs("int8") is None  # not measured for that codec
    assert _profile().kv_link_gbs() is None


def test_pooling_profile_sessions_takes_the_median_of_all_samples() -> None:
    from thunderserve.profiling.schema import pool_profiles

    a = _shared_profile()
    slower = tuple(m.model_copy(update={"latency_s": 3 * m.latency_s, "samples_s": tuple(3 * x for x in m.samples_s)})
                   for m in a.measurements)
    b = a.model_copy(update={"measurements": slower})
    pooled = pool_profiles([a, b])
    assert pooled.repeats == 6 and [m.shape for m in pooled.measurements] == [m.shape for m in a.measurements]
    for m, x, y in zip(pooled.measurements, a.measurements, b.measurements, strict=True):
        assert len(m.samples_s) == 6 and m.latency_s == pytest.approx((x.samples_s[2] + y.samples_s[0]) / 2)
    assert pooled.shared_measurements[0].samples_s == 2 * a.shared_measurements[0].samples_s
    with pytest.raises(ValueError, match="must share model"):
        pool_profiles([a, a.model_copy(update={"neighbours": 2})])
    with pytest.raises(ValueError, match="no profiles"):
        pool_profiles([])


def test_cpu_time_per_measurement_gives_the_share_of_the_cores_the_profiler_got() -> None:
    clock = FakeClock()
    engine = CostEngine(clock)

    def half_cpu() -> float:  # the measuring process gets half a core: CPU time runs at half the wall clock
        return clock.now / 2

    timer = Timer(clock=clock, cpu_clock=half_cpu)
    ms = profile_engine(engine, GRID, 1000, timer=timer)  # type: ignore[arg-type]
    assert all(m.cpu_s == pytest.approx(m.latency_s / 2) for m in ms)
    prof = _profile().model_copy(update={"measurements": tuple(ms)})
    assert prof.cpu_share() == pytest.approx(0.5 / prof.device.threads)
    assert prof.cpu_share(shared=True) is None and _profile().cpu_share() is None


def test_samples_at_a_given_cpu_share_replay_cpu_seconds() -> None:
    prof = _shared_profile()
    with_cpu = prof.model_copy(update={
        "measurements": tuple(m.model_copy(update={"cpu_s": m.latency_s / 2}) for m in prof.measurements),
        "shared_measurements": tuple(m.model_copy(update={"cpu_s": m.latency_s / 4})
                                     for m in prof.shared_measurements)})
    threads = prof.device.threads
    share = {(PassKind.PREFILL, False): 0.25, (PassKind.PREFILL, True): 0.125, (PassKind.DECODE, False): 0.5}
    alone = {m.shape: m for m in with_cpu.measurements}
    shared = {m.shape: m for m in with_cpu.shared_measurements}
    for s in with_cpu.samples({PassKind.PREFILL: 0.5, PassKind.DECODE: 1.0}, share):
        k = (s.phase, s.batch_size, s.tokens)
        if s.phase is PassKind.PREFILL:
            t_alone = alone[k].latency_s / 2 / (0.25 * threads)
            t_shared = shared[k].latency_s / 4 / (0.125 * threads)
            assert s.measured_s == pytest.approx(t_alone + 0.5 * (t_shared - t_alone))
        else:  # (decode, True) not given: the shared wall time as measured
            assert s.measured_s == pytest.approx(shared[k].latency_s)
    with pytest.raises(ValueError, match=r"cpu_share\[.*\] must be positive"):
        with_cpu.samples(None, {(PassKind.DECODE, False): 0.0})
