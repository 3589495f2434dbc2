"""Spec loading: catalogs, cluster YAML resolution, HF config, and the one-line error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from builders import make_cluster
from thunderserve.errors import SpecError
from thunderserve.spec import gpu_catalog, load_cluster, load_model, load_workload, model_catalog
from thunderserve.spec.cluster import GBPS_TO_BYTES

CATALOG_NAMES = ["A100-80GB", "A100-40GB", "H100-SXM", "H100-PCIe", "L40S", "L40", "A40", "RTX-A6000",
                 "RTX-A5000", "RTX-3090", "RTX-3090Ti", "RTX-4090", "A10G", "L4", "T4", "V100"]


def test_gpu_catalog_has_exactly_the_named_types() -> None:
    assert sorted(g.name for g in gpu_catalog().values()) == sorted(CATALOG_NAMES)


def test_model_catalog_names() -> None:
    assert set(model_catalog()) == {"llama-2-7b", "llama-2-13b", "llama-30b", "llama-2-70b", "llama-3-8b",
                                    "llama-3-70b", "codellama-34b", "qwen-72b", "smollm2-135m"}


def test_llama_2_7b_parameter_count() -> None:
    m = load_model("llama-2-7b")
    assert m.num_params == pytest.approx(6.74e9, rel=0.01)


def test_gqa_kv_bytes_per_token() -> None:
    m = load_model("llama-2-70b")  # 80 layers, 8 KV heads of dim 128, fp16
    assert m.kv_bytes_per_token == 80 * 2 * 8 * 128 * 2 == 327_680


def test_paper_cloud_32_is_32_gpus_at_13_54_per_hour() -> None:
    c = load_cluster("paper-cloud-32")
    assert c.num_gpus == 32
    assert c.cost_usd_per_hour == pytest.approx(13.544)
    assert c.gpu_types() == ["A40", "L40S", "RTX-3090Ti", "RTX-A6000"]
    assert load_cluster("inhouse-8xa100").cost_usd_per_hour == pytest.approx(13.54)


def test_network_most_specific_rule_wins() -> None:
    c = make_cluster((("a", "TOY", 1), ("b", "TOY", 1), ("c", "TOY", 1)), default_gbps=10,
                     zones=[{"between": ["a", "b"], "gbps": 20}], links=[{"between": ["a", "b"], "gbps": 40}])
    ga, gb, gc = c.gpus
    assert c.bandwidth_bytes_s(ga, gb) == 40 * GBPS_TO_BYTES
    assert c.bandwidth_bytes_s(gb, ga) == 40 * GBPS_TO_BYTES
    assert c.bandwidth_bytes_s(ga, gc) == 10 * GBPS_TO_BYTES


def test_gpu_names_match_case_insensitively(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nnodes:\n  - {name: n0, gpu: a40, count: 2}\n")
    assert load_cluster(str(p)).gpus[0].spec.name == "A40"


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("nodes:\n  - {name: n0, gpu: B200, count: 1}\n", "nodes.0.gpu: unknown GPU type 'B200'"),
    ("nodes: [ {name: n0, gpu: A40, count: 1}\n", "malformed YAML"),
    ("nodes:\n  - {name: n0, gpu: A40, count: 1}\nnetwork: {default_gbps: -3}\n",
     "network.default_gbps: Input should be greater than 0"),
    ("nodes:\n  - {name: n0, gpu: A40, count: 1}\n  - {name: n0, gpu: A40, count: 1}\n",
     "duplicate node name 'n0'"),
    ("nodes:\n  - {name: n0, gpu: A40, count: 0}\n", "nodes.0.count: Input should be greater than 0"),
    ("nodes:\n  - {name: n0, gpu: A40, count: 1}\nnetwork:\n  links: [{between: [n0, n9], gbps: 1}]\n",
     "unknown node 'n9'"),
])
def test_bad_cluster_yaml_names_file_and_field(tmp_path: Path, yaml_text: str, message: str) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml_text)
    with pytest.raises(SpecError) as info:
        load_cluster(str(p))
    assert str(p) in str(info.value)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_model_lists_catalog() -> None:
    with pytest.raises(SpecError, match="unknown model 'gpt-5'.*llama-30b"):
        load_model("gpt-5")


def test_hf_config_json(tmp_path: Path) -> None:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 300, "torch_dtype": "bfloat16", "max_position_embeddings": 512}))
    m = load_model(str(d))
    assert (m.name, m.num_layers, m.num_kv_heads, m.dtype_bytes, m.max_context_tokens) == ("tiny", 4, 2, 2, 512)


def test_hf_config_missing_field(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(SpecError, match="num_hidden_layers: missing"):
        load_model(str(p))


def test_workload_presets_match_the_published_trace_stats() -> None:
    code, conv = load_workload("coding"), load_workload("conversation")
    assert (code.num_requests, conv.num_requests) == (8819, 19366)
    assert code.mean_prompt_tokens == pytest.approx(2048, rel=0.01)
    assert conv.mean_output_tokens == pytest.approx(211, rel=0.01)


def test_poisson_requests_rate_and_determinism() -> None:
    w = load_workload("conversation")
    t1, p1, o1 = w.poisson_requests(10.0, 1000.0, seed=3)
    t2, p2, o2 = w.poisson_requests(10.0, 1000.0, seed=3)
    assert (t1 == t2).all() and (p1 == p2).all() and (o1 == o2).all()
    assert t1.size == pytest.approx(10_000, rel=0.05)
    assert (t1 < 1000).all() and (abs(t1.mean() - 500) < 20)
