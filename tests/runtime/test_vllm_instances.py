"""vLLM launch specs from a plan: TP/PP degrees, uneven layer split, kv_both connector, ports, GPUs."""

from __future__ import annotations

import json

import pytest

from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Phase, Plan, Routing, Stage
from thunderserve.runtime.vllm.instances import VllmConfig, find_vllm_python, instance_specs, layer_partition


def plan() -> Plan:
    p0 = Group(id="p0", phase=Phase.PREFILL, stages=(Stage(gpus=("a:0", "a:1"), layers=(0, 30)),))
    d0 = Group(id="d0", phase=Phase.DECODE, stages=(Stage(gpus=("b:2",), layers=(0, 12)),
                                                    Stage(gpus=("b:3",), layers=(12, 30))))
    return Plan(model="m", cluster="c", groups=(p0, d0), routing=Routing(entry={"p0": 1.0}, kv={"p0": {"d0": 1.0}}))


def test_specs_carry_parallelism_partition_connector_and_ports() -> None:
    cfg = VllmConfig(python="/x/python", cache_root="/tmp/c")
    d0, p0 = instance_specs(plan(), "/models/m", "m", cfg, {"p0": (8001, 9001), "d0": (8002, 9002)})
    assert (p0.group_id, p0.node, p0.tp, p0.pp, p0.gpu_indices) == ("p0", "a", 2, 1, (0, 1))
    assert (d0.group_id, d0.node, d0.tp, d0.pp, d0.gpu_indices) == ("d0", "b", 1, 2, (2, 3))
    assert d0.env["VLLM_PP_LAYER_PARTITION"] == "12,18" and "VLLM_PP_LAYER_PARTITION" not in p0.env
    assert (p0.env["VLLM_NIXL_SIDE_CHANNEL_PORT"], d0.env["VLLM_NIXL_SIDE_CHANNEL_PORT"]) == ("9001", "9002")
    argv = list(p0.argv)
    assert argv[:3] == ["/x/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "8001"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    kv = json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert kv == {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu",
                  "kv_connector_module_path": "thunderserve_nixl"}
    assert p0.env["THUNDERSERVE_NIXL_PROGRESS_DELAY_US"] == "1000" and p0.env["THUNDERSERVE_VLLM_SPIN_S"] == "0"
    assert "--enforce-eager" in argv and p0.env["VLLM_CACHE_ROOT"] == "/tmp/c"
    assert p0.url == "http://127.0.0.1:8001"


def test_missing_port_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match="groups.p0"):
        instance_specs(plan(), "/m", "m", VllmConfig(python="p"), {"d0": (1, 2)})


def test_layer_partition_and_python_lookup(tmp_path: object) -> None:
    assert layer_partition(plan().group("d0")) == "12,18"
    from pathlib import Path

    root = Path(str(tmp_path))
    assert find_vllm_python(root=root) is None
    (root / ".venv-vllm" / "bin").mkdir(parents=True)
    (root / ".venv-vllm" / "bin" / "python").write_text("")
    assert find_vllm_python(root=root) == str(root / ".venv-vllm" / "bin" / "python")
    assert find_vllm_python("/no/such/python") is None


def test_ray_respec_picks_node_ports_and_advertises_node_ip() -> None:
    from thunderserve.runtime.vllm.ray_launcher import respec_on_node

    cfg = VllmConfig(python="p", host="0.0.0.0")
    spec = instance_specs(plan(), "/m", "m", cfg, {"p0": (1, 2), "d0": (3, 4)})[1]
    moved = respec_on_node(spec, "10.0.0.7", (8100, 8101))
    argv = list(moved.argv)
    assert argv[argv.index("--port") + 1] == "8100" and argv[argv.index("--host") + 1] == "0.0.0.0"
    assert moved.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "8101"
    assert moved.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.7"
    assert (moved.port, moved.side_channel_port) == (8100, 8101)


def test_paced_nixl_module_is_importable_by_instances_and_can_be_turned_off() -> None:
    from thunderserve.runtime.vllm.instances import VLLM_SIDE_DIR, environment_for

    spec = instance_specs(plan(), "/m", "m", VllmConfig(python="p"), {"p0": (1, 2), "d0": (3, 4)})[0]
    env = environment_for(spec, base={"PYTHONPATH": "/mine"})
    assert env["PYTHONPATH"].split(":") == [str(VLLM_SIDE_DIR), "/mine"]
    assert (VLLM_SIDE_DIR / "thunderserve_nixl.py").is_file()
    busy = instance_specs(plan(), "/m", "m", VllmConfig(python="p", nixl_progress_delay_ms=None, spin_s=None),
                          {"p0": (1, 2), "d0": (3, 4)})[0]
    argv = list(busy.argv)
    assert "kv_connector_module_path" not in json.loads(argv[argv.index("--kv-transfer-config") + 1])
    assert "THUNDERSERVE_NIXL_PROGRESS_DELAY_US" not in busy.env and "THUNDERSERVE_VLLM_SPIN_S" not in busy.env
