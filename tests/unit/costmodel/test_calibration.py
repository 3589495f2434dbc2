"""Calibration: the A100/A40 fit, its prediction of the unseen H100, the shipped defaults, and applying them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from builders import TOY_GPU, make_cluster, make_model
from thunderserve.costmodel import group_perf
from thunderserve.costmodel.calibration import (
    Calibration,
    FitErrors,
    GpuCalibration,
    apply_calibration,
    calibrated_gpu,
    default_calibration,
    dump_calibration,
    fit_engine_profile,
    fit_gpu_profiles,
    merge,
    parse_calibration,
)
from thunderserve.costmodel.fit import (
    GemmArrays,
    PassKind,
    RooflineFactors,
    StageSample,
    fit_gemm,
    gemm_time_s,
    predict_stage_s,
)
from thunderserve.costmodel.perf import roofline_time_s
from thunderserve.errors import SpecError
from thunderserve.profiling.fidelity import gemm_fidelity, summarize
from thunderserve.profiling.vidur import load_profile_dir, packaged_profiles_dir
from thunderserve.profiling.vidur_ops import read_op_terms
from thunderserve.spec import GpuSpec, gpu_catalog, lookup_gpu


@pytest.fixture(scope="module")
def all_profiles():  # type: ignore[no-untyped-def]
    return load_profile_dir(packaged_profiles_dir())


@pytest.fixture(scope="module")
def a100_a40_fit(all_profiles):  # type: ignore[no-untyped-def]
    g = all_profiles.gemms
    train = g.select(np.isin(g.gpu, ["A100-80GB", "A40"]))
    specs = {f.gpu.name: f.gpu for f in all_profiles.files}
    terms = read_op_terms(all_profiles.files, ["A100-80GB", "A40"])
    shared, per_gpu = fit_gpu_profiles(train, specs, all_profiles.elementwise_fixed_us, terms.elementwise,
                                       terms.attention)
    return merge(shared, per_gpu, ["packaged a100, a40"])


def test_fit_on_a100_a40_is_within_ten_percent(a100_a40_fit: Calibration) -> None:
    assert a100_a40_fit.shared is not None
    assert a100_a40_fit.shared.fitted_on == ("A100-80GB", "A40")
    assert a100_a40_fit.shared.errors.median_relative_error < 0.10
    for g in a100_a40_fit.gpus:
        assert g.errors.median_relative_error < 0.10, g.spec.name
        assert g.errors.num_points == 3 * 4 * 1036  # 3 models x 4 GEMMs x distinct (tokens, tp)


def test_unseen_h100_is_predicted_from_its_datasheet_within_fifteen_percent(all_profiles, a100_a40_fit) -> None:
    report = summarize(gemm_fidelity(a100_a40_fit, all_profiles.gemms))
    h100 = report["by_gpu"]["H100-SXM"]
    assert h100["basis"] == "shared"
    assert h100["num_points"] == 12432
    assert h100["median_relative_error"] < 0.15
    assert report["by_gpu"]["A100-80GB"]["basis"] == "fitted"
    assert report["median_relative_error"] < 0.10
    assert set(report["by_model"]) == {"llama-2-7b", "llama-2-70b", "codellama-34b"}


def test_fitted_factors_are_physical(a100_a40_fit: Calibration) -> None:
    sh = a100_a40_fit.shared
    assert sh is not None
    assert 0.6 < sh.compute_efficiency < 0.9 and 0.6 < sh.memory_efficiency < 0.9
    assert 30 < sh.compute_saturation_tokens < 200  # tile padding: tens to a couple hundred rows
    assert 1 < sh.op_overhead_us < 20
    assert sh.layer_overhead_us == pytest.approx(4 * sh.op_overhead_us + sh.elementwise_overhead_us)


def test_shipped_default_is_the_a100_a40_fit(a100_a40_fit: Calibration) -> None:
    shipped = default_calibration()
    assert shipped.shared is not None and a100_a40_fit.shared is not None
    for field in ("compute_efficiency", "memory_efficiency", "compute_saturation_tokens", "op_overhead_us",
                  "elementwise_overhead_us", "elementwise_memory_efficiency", "attention_prefill_efficiency",
                  "attention_pad_tokens", "attention_decode_memory_efficiency"):
        assert getattr(shipped.shared, field) == pytest.approx(getattr(a100_a40_fit.shared, field), rel=1e-3)
    assert [g.spec for g in shipped.gpus] == [g.spec for g in a100_a40_fit.gpus]


def test_catalog_carries_the_default_calibration() -> None:
    calib = default_calibration()
    for spec in gpu_catalog().values():
        assert calibrated_gpu(spec, calib) == spec, spec.name
    a100 = lookup_gpu("A100-80GB")
    assert a100.compute_efficiency == calib.gpu("A100-80GB").spec.compute_efficiency  # type: ignore[union-attr]


def test_attention_and_elementwise_fits_match_their_kernels(a100_a40_fit: Calibration) -> None:
    sh = a100_a40_fit.shared
    assert sh is not None and sh.attention_errors is not None
    # Vidur's A100 FlashAttention: prefill at ~40% of peak FLOP/s, decode KV reads at ~90% of bandwidth
    assert 0.2 < (sh.attention_prefill_efficiency or 0) < 0.6
    assert 0.7 < (sh.attention_decode_memory_efficiency or 0) <= 1.0
    for kind in ("prefill", "decode"):
        assert sh.attention_errors[kind].median_relative_error < 0.10, kind
    # element-wise kernels are bandwidth bound well below peak
    assert 0.4 < (sh.elementwise_memory_efficiency or 0) < 0.9


def test_vectorised_gemm_time_matches_perf_roofline() -> None:
    rng = np.random.default_rng(0)
    f = RooflineFactors(0.7, 0.8, 90.0, 6.0)
    flops, mem, tokens = rng.uniform(1e6, 1e12, 50), rng.uniform(1e5, 1e9, 50), rng.integers(1, 4096, 50)
    vec = gemm_time_s(flops, mem, tokens.astype(float), np.full(50, 312e12), np.full(50, 2e12), f)
    for i in range(50):
        scalar = roofline_time_s(flops[i], mem[i], float(tokens[i]), 312e12 * 0.7, 2e12 * 0.8, 90.0) + 6e-6
        assert vec[i] == pytest.approx(scalar, rel=1e-12)


def test_fit_recovers_known_gemm_factors() -> None:
    truth = RooflineFactors(0.65, 0.85, 64.0, 4.0)
    m = np.repeat(np.array([1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096], dtype=float), 3)
    k, n = np.tile([4096.0, 8192.0, 11008.0], 10), np.tile([12288.0, 4096.0, 4096.0], 10)
    peak, bw = np.full(30, 312e12), np.full(30, 2039e9)
    flops, mem = 2 * m * k * n, 2 * (m * k + k * n + m * n)
    data = GemmArrays(flops, mem, m, peak, bw, gemm_time_s(flops, mem, m, peak, bw, truth))
    fit = fit_gemm(data)
    assert fit.factors.compute_efficiency == pytest.approx(0.65, rel=1e-3)
    assert fit.factors.memory_efficiency == pytest.approx(0.85, rel=1e-3)
    assert fit.factors.compute_saturation_tokens == pytest.approx(64.0, rel=1e-2)
    assert fit.errors.median_relative_error < 1e-4


def test_saturation_makes_small_batches_compute_costlier() -> None:
    sat = dict(TOY_GPU, compute_saturation_tokens=100.0)
    base = make_cluster((("n0", "TOY", 1),))
    padded = make_cluster((("n0", "TOY", 1),), gpu_types=(sat,))
    model = make_model()
    plain = group_perf(model, [(base.gpus, 2)], base).stages[0]
    slow = group_perf(model, [(padded.gpus, 2)], padded).stages[0]
    assert slow.compute_saturation_tokens == 100.0
    # 4096 prompt tokens are compute bound: the linear layers' time grows by (4096 + 100) / 4096, the other
    # per-operation terms (attention, element-wise, overheads) do not change
    t0 = plain.prefill_time_s(4096.0, 4096.0**2)
    lin0 = plain.linear_time_s(4096.0, 1.0)
    expected = t0 - lin0 + lin0 * (4096 + 100) / 4096
    assert slow.prefill_time_s(4096.0, 4096.0**2) == pytest.approx(expected, rel=1e-12)


def _toy_spec(**kw: float) -> GpuSpec:
    return GpuSpec.model_validate({**TOY_GPU, "name": "CPU", **kw})


def test_engine_profile_fit_round_trips_through_stage_perf() -> None:
    model = make_model(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=4, intermediate_size=1536)
    truth = _toy_spec(fp16_tflops=0.2, memory_bandwidth_gbs=20, compute_efficiency=0.45, memory_efficiency=0.6,
                      compute_saturation_tokens=4.0, layer_overhead_us=150.0)
    samples = [StageSample(PassKind.PREFILL, b, L, 1.0) for b in (1, 2, 4) for L in (16, 64, 256)]
    samples += [StageSample(PassKind.DECODE, b, c, 1.0) for b in (1, 4, 16, 64) for c in (32, 256)]
    times = predict_stage_s(model, truth, samples)
    measured = [dataclasses.replace(s, measured_s=float(t)) for s, t in zip(samples, times, strict=True)]
    fitted = fit_engine_profile(model, _toy_spec(fp16_tflops=0.2, memory_bandwidth_gbs=20), measured)
    assert fitted.source == "engine-profile"
    assert fitted.errors.median_relative_error < 1e-3
    assert fitted.spec.compute_efficiency == pytest.approx(0.45, rel=1e-2)
    assert fitted.spec.memory_efficiency == pytest.approx(0.6, rel=1e-2)
    assert fitted.spec.layer_overhead_us == pytest.approx(150.0, rel=2e-2)


def test_apply_calibration_returns_a_new_cluster_with_fitted_factors() -> None:
    calib = default_calibration()
    fit_cpu = _toy_spec(compute_efficiency=0.3, memory_efficiency=0.4, layer_overhead_us=99.0)
    errors = FitErrors(num_points=4, median_relative_error=0.1, p90_relative_error=0.2, mean_relative_error=0.1)
    calib = merge(calib.shared, [*calib.gpus, GpuCalibration(spec=fit_cpu, source="engine-profile", errors=errors)],
                  ["test"])
    h100 = lookup_gpu("H100-SXM").model_copy(update={"compute_efficiency": 0.5})
    cluster = make_cluster((("a", "A100-80GB", 2), ("h", "H100-SXM", 1), ("c", "CPU", 1)),
                           gpu_types=(h100.model_dump(), {**TOY_GPU, "name": "CPU"}))
    out = apply_calibration(cluster, calib)
    assert out is not cluster and out.num_gpus == cluster.num_gpus
    by = {g.id: g.spec for g in out.gpus}
    assert by["a:0"] == lookup_gpu("A100-80GB")  # already calibrated in the catalog
    assert by["h:0"].compute_efficiency == calib.shared.compute_efficiency  # type: ignore[union-attr]
    assert by["h:0"].fp16_tflops == 989  # facts kept
    assert by["c:0"].layer_overhead_us == 99.0 and by["c:0"].compute_efficiency == 0.3
    assert cluster.by_id["h:0"].spec.compute_efficiency == 0.5  # the input is not mutated
    assert out.by_id["c:0"].price_usd_per_hour == cluster.by_id["c:0"].price_usd_per_hour


def test_calibration_file_round_trip_and_errors() -> None:
    calib = default_calibration()
    assert parse_calibration(dump_calibration(calib), "x.json") == calib
    with pytest.raises(SpecError, match=r"^bad\.json: malformed JSON at line 1"):
        parse_calibration("{nope", "bad.json")
    with pytest.raises(SpecError, match=r"^p\.json: format: not a calibration file"):
        parse_calibration('{"format": "thunderserve-profile/1"}', "p.json")
    with pytest.raises(SpecError, match=r"^c\.json: shared\.compute_efficiency: "):
        text = dump_calibration(calib).replace('"compute_efficiency": 0.7694', '"compute_efficiency": 1.5', 1)
        parse_calibration(text, "c.json")
