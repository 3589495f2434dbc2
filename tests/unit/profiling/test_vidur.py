"""Vidur profile reading: folder mapping, GEMM shapes, and one-line errors for bad or foreign files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from thunderserve.errors import SpecError
from thunderserve.profiling.vidur import (
    ELEMENTWISE_OPS,
    GemmOp,
    discover,
    load_profile_dir,
    packaged_profiles_dir,
    parse_map,
    time_column,
)

SHAPE = {"n_head": "32", "n_kv_head": "8", "n_embd": "4096", "n_expanded_embd": "14336", "vocab_size": "128256",
         "use_gated_mlp": "True"}


def write_profile(root: Path, rows: list[dict[str, str]], gpu: str = "a100", model: str = "My-Model",
                  columns: list[str] | None = None) -> Path:
    path = root / gpu / "org" / model / "mlp.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = columns or list(rows[0])
    lines = [",".join(cols)] + [",".join(r.get(c, "") for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def row(tokens: int = 16, tp: int = 1, ms: float = 0.1, **over: str) -> dict[str, str]:
    r = {time_column(op): str(ms) for op in GemmOp}
    r.update({time_column(op): "0.005" for op in ELEMENTWISE_OPS})
    r.update(SHAPE)
    r.update({"num_tokens": str(tokens), "num_tensor_parallel_workers": str(tp)})
    r.update(over)
    return r


def test_gemm_shapes_follow_the_tp_sharding(tmp_path: Path) -> None:
    write_profile(tmp_path, [row(16, 2), row(16, 2, ms=0.3), row(64, 1)])
    data = load_profile_dir(tmp_path)
    g = data.gemms
    assert len(g) == 8  # 2 distinct (tokens, tp) x 4 ops; the duplicate rows reduce to their median
    got = {(o, int(t), int(p)): (int(k), int(n)) for o, t, p, k, n in zip(g.op, g.num_tokens, g.tp, g.k, g.n,
                                                                          strict=True)}
    assert got[("attn_pre_proj", 16, 2)] == (4096, (32 + 2 * 8) * 128 // 2)
    assert got[("attn_post_proj", 16, 2)] == (4096 // 2, 4096)
    assert got[("mlp_up_proj", 16, 2)] == (4096, 2 * 14336 // 2)
    assert got[("mlp_down_proj", 64, 1)] == (14336, 4096)
    i = list(zip(g.op, g.num_tokens, strict=True)).index(("mlp_up_proj", 16))
    assert g.measured_s[i] == pytest.approx(0.2e-3)  # median of 0.1 and 0.3 ms
    assert g.gpu[i] == "A100-80GB" and g.model[i] == "My-Model"
    assert g.peak_flops_s[i] == 312e12
    assert data.elementwise_fixed_us["A100-80GB"] == pytest.approx(6 * 5.0)  # 4 kernels + 2 adds at 5 us


def test_default_maps_name_vidur_folders() -> None:
    files = discover(packaged_profiles_dir())
    assert {f.gpu.name for f in files} == {"A100-80GB", "A40", "H100-SXM"}
    assert {f.model for f in files} == {"llama-2-7b", "llama-2-70b", "codellama-34b"}
    only = discover(packaged_profiles_dir(), gpus=["H100-SXM"])
    assert {f.gpu_folder for f in only} == {"h100"}
    one_gpu_dir = discover(packaged_profiles_dir() / "a40")
    assert {f.gpu.name for f in one_gpu_dir} == {"A40"} and len(one_gpu_dir) == 3


def test_maps_are_overridable(tmp_path: Path) -> None:
    write_profile(tmp_path, [row()], gpu="mygpu", model="Llama-2-7b-hf",
                  columns=None)
    with pytest.raises(SpecError, match=r"mlp\.csv: GPU folder \(map it with --gpu-map folder=TYPE\): "
                                         r"unknown GPU type 'mygpu'"):
        discover(tmp_path)
    # Llama-2-7b-hf maps to llama-2-7b by default, whose shape differs from this file's (GQA, 14336)
    with pytest.raises(SpecError, match=r"n_kv_head: 8 does not match model 'llama-2-7b' \(32\); fix --model-map"):
        load_profile_dir(tmp_path, gpu_map={"mygpu": "L40S"})
    data = load_profile_dir(tmp_path, gpu_map={"mygpu": "L40S"}, model_map={"Llama-2-7b-hf": "llama-3-8b"})
    assert set(data.gemms.gpu) == {"L40S"} and set(data.gemms.model) == {"llama-3-8b"}


def test_parse_map() -> None:
    assert parse_map("a100=A100-80GB, a40=A40", "--gpu-map") == {"a100": "A100-80GB", "a40": "A40"}
    assert parse_map(None, "--gpu-map") == {}
    with pytest.raises(SpecError, match=r"^--gpu-map: expected folder=name pairs separated by commas, got 'a100'"):
        parse_map("a100", "--gpu-map")


@pytest.mark.parametrize(("change", "message"), [
    ({time_column("mlp_up_proj"): "nan"}, r"time_stats\.mlp_up_proj\.median: row 2: not a finite number \('nan'\)"),
    ({time_column("attn_pre_proj"): "0"}, r"time_stats\.attn_pre_proj\.median: row 2: must be positive, got 0"),
    ({time_column("mlp_down_proj"): "-1.5"}, r"time_stats\.mlp_down_proj\.median: row 2: must be positive"),
    ({time_column("attn_post_proj"): "fast"}, r"time_stats\.attn_post_proj\.median: row 2: not a number"),
    ({time_column("attn_post_proj"): ""}, r"time_stats\.attn_post_proj\.median: row 2: not a number \(''\)"),
    ({"num_tokens": "1.5"}, r"num_tokens: row 2: must be a whole number, got 1\.5"),
    ({"n_embd": "inf"}, r"n_embd: row 2: not a finite number"),
])
def test_bad_values_name_file_column_and_row(tmp_path: Path, change: dict[str, str], message: str) -> None:
    path = write_profile(tmp_path, [row(**change)])
    with pytest.raises(SpecError, match=rf"^{path}: {message}"):
        load_profile_dir(tmp_path)


def test_missing_column_empty_and_headerless_files(tmp_path: Path) -> None:
    r = row()
    cols = [c for c in r if c != time_column("mlp_act") and c != "num_tensor_parallel_workers"]
    path = write_profile(tmp_path, [r], columns=cols)
    with pytest.raises(SpecError, match=rf"^{path}: num_tensor_parallel_workers: missing column"):
        load_profile_dir(tmp_path)
    path.write_text("")
    with pytest.raises(SpecError, match=rf"^{path}: empty file"):
        load_profile_dir(tmp_path)
    path.write_text(",".join(r) + "\n")
    with pytest.raises(SpecError, match=rf"^{path}: no data rows"):
        load_profile_dir(tmp_path)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match=rf"^{path}: "):
        load_profile_dir(tmp_path)


def test_foreign_csv_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a100" / "mlp.csv"
    path.parent.mkdir()
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.1,100,20\n")
    with pytest.raises(SpecError, match=rf"^{path}: time_stats\.attn_pre_proj\.median: missing column "
                                        r"\(not a Vidur mlp\.csv profile\?\)"):
        load_profile_dir(tmp_path)


def test_elementwise_columns_are_optional(tmp_path: Path) -> None:
    r = row()
    cols = [c for c in r if c != time_column("mlp_act")]
    write_profile(tmp_path, [r], columns=cols)
    data = load_profile_dir(tmp_path)
    assert len(data.gemms) == 4 and data.elementwise_fixed_us == {}


def test_no_profiles_found(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=rf"^{tmp_path}: no mlp\.csv files found"):
        discover(tmp_path)
    with pytest.raises(SpecError, match=r"no such profile directory"):
        discover(tmp_path / "missing")
    shutil.copytree(packaged_profiles_dir() / "a40", tmp_path / "a40")
    with pytest.raises(SpecError, match=r"no mlp\.csv files found for GPUs h100"):
        discover(tmp_path, gpus=["h100"])
