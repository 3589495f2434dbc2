"""The engine profile file (`thunderserve profile -o profile.json`), format "thunderserve-profile/1".

It records the device (CPU model and threads or GPU name, the dtype the engine ran in, and the device's peak
FLOP/s and memory bandwidth as measured by a matmul / copy microbenchmark), the model shape as the engine ran it,
and median latencies of whole-model prefill passes (batch size x prompt tokens) and decode steps (batch size x
context tokens), plus KV quantise/dequantise costs when the runtime provides a quantiser and the time to ship
an encoded cache to another local worker (`kv_link`), which `kv_link_gbs` turns into a link bandwidth.
`calibrate --profile` fits a pseudo GPU type for the device from it (see `costmodel.calibration`).

A profile taken with busy neighbours (`neighbours` > 0: the deployment's other workers on the same machine,
see `profiling.neighbours`) also holds `shared_measurements`: the same shapes measured right after with the
neighbours computing. `samples(neighbour_busy=...)` then gives each shape's expected latency when its
neighbours are busy a fraction rho of the time (time sharing: t = t_alone + rho * (t_shared - t_alone)).

On a CPU every measurement also records the CPU seconds the measuring process used (`cpu_s`): CPU / wall time
is the share of its cores it got (`cpu_share`), and `samples(cpu_share=...)` replays the CPU cost at another
share (another load of a shared machine). Several sessions of one profile pool into one (`pool_profiles`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from thunderserve.costmodel.comm import Compression
from thunderserve.costmodel.fit import PassKind, StageSample
from thunderserve.costmodel.kv import kv_bytes
from thunderserve.errors import SpecError
from thunderserve.spec._load import first_error
from thunderserve.spec.gpu import GpuSpec
from thunderserve.spec.model import ModelSpec

FORMAT: Literal["thunderserve-profile/1"] = "thunderserve-profile/1"

_Pos = Field(gt=0, allow_inf_nan=False)


class DeviceInfo(BaseModel):
    """The measured device and its microbenchmarked peaks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["cpu", "cuda"]
    name: str  # CPU model name or CUDA device name
    gpu_type: str = Field(min_length=1)  # name of the pseudo GPU type calibration fits (e.g. "CPU")
    threads: int = Field(gt=0)  # torch intra-op threads (CPU) or 1
    torch_version: str
    dtype: str  # engine compute dtype, e.g. "float32"
    peak_tflops: float = _Pos  # measured dense matmul throughput in `dtype`, TFLOP/s
    memory_bandwidth_gbs: float = _Pos  # measured copy bandwidth (read + write), GB/s
    memory_gb: float = _Pos  # device memory (RAM for a CPU), GB


class Measurement(BaseModel):
    """Median latency of one whole-model forward pass shape."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    phase: PassKind
    batch_size: int = Field(gt=0)
    tokens: int = Field(gt=0)  # prompt tokens per sequence (prefill) or context tokens per sequence (decode)
    latency_s: float = _Pos  # median over repetitions
    samples_s: tuple[float, ...] = ()  # every timed repetition
    cpu_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # median CPU seconds of the measuring
    #   process per repetition (all its threads); cpu_s / latency_s / threads = share of its cores it got

    def sample(self) -> StageSample:
        return StageSample(self.phase, self.batch_size, self.tokens, self.latency_s)

    @property
    def shape(self) -> tuple[PassKind, int, int]:
        return self.phase, self.batch_size, self.tokens


class KvMeasurement(BaseModel):
    """Cost of compressing one request's KV cache for transfer and restoring it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    tokens: int = Field(gt=0)
    raw_bytes: int = Field(gt=0)
    encoded_bytes: int = Field(gt=0)
    encode_s: float = _Pos  # median
    decode_s: float = _Pos  # median
    transfer_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # median send -> ack of the
    #   encoded cache to another local worker (runtime KV transport over loopback TCP); None: not measured

    @property
    def path_s(self) -> float | None:
        """Encode + transfer + decode: one request's KV from a prefill worker to a decode worker here."""
        return None if self.transfer_s is None else self.encode_s + self.transfer_s + self.decode_s


class EngineProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["thunderserve-profile/1"] = FORMAT
    device: DeviceInfo
    model: ModelSpec  # shape as run (dtype_bytes = the engine's compute dtype)
    engine: str  # what was profiled (model path or name)
    warmup: int = Field(ge=0)
    repeats: int = Field(gt=0)
    measurements: tuple[Measurement, ...] = Field(min_length=1)
    kv: tuple[KvMeasurement, ...] = ()
    notes: tuple[str, ...] = ()
    neighbours: int = Field(default=0, ge=0)  # busy neighbour processes during shared_measurements
    shared_measurements: tuple[Measurement, ...] = ()  # the same shapes, measured with the neighbours busy

    @model_validator(mode="after")
    def _shared_match(self) -> EngineProfile:
        if self.shared_measurements:
            if self.neighbours < 1:
                raise ValueError("neighbours: shared_measurements need at least 1 neighbour")
            alone = {m.shape for m in self.measurements}
            extra = [m.shape for m in self.shared_measurements if m.shape not in alone]
            if extra:
                k, b, t = extra[0]
                raise ValueError(f"shared_measurements: {k.value} b={b} tokens={t} was not measured alone")
        return self

    def samples(self, neighbour_busy: Mapping[PassKind, float] | None = None,
                cpu_share: Mapping[tuple[PassKind, bool], float] | None = None) -> list[StageSample]:
        """The measured shapes as fit inputs: alone, or with neighbours busy a fraction of the time per phase.

        `neighbour_busy[phase]` in [0, 1] is how often the neighbours compute while this device runs a pass of
        that phase; each shape's latency becomes t_alone + rho * (t_shared - t_alone) (shapes with no shared
        measurement, or phases not given, stay alone).

        `cpu_share[(phase, neighbour_busy)]`, when given, is the share of a core the device gets while running
        a pass of that phase (alone: False, next to a busy neighbour: True); a measurement's latency is then its
        CPU seconds at that share, cpu_s / (share * threads), instead of the wall time the profiler saw. On a
        machine other jobs load, the share the profiler got and the share a deployment gets differ; this
        replays the measured CPU cost at the deployment's share (entries missing: wall time as measured).
        """
        for phase, rho in (neighbour_busy or {}).items():
            if not 0.0 <= rho <= 1.0:
                raise ValueError(f"neighbour_busy[{phase}] must be in [0, 1], got {rho}")
        for key, share in (cpu_share or {}).items():
            if not share > 0:
                raise ValueError(f"cpu_share[{key}] must be positive, got {share}")
        threads = self.device.threads

        def latency(m: Measurement, busy: bool) -> float:
            share = (cpu_share or {}).get((m.phase, busy))
            return m.cpu_s / (share * threads) if share and m.cpu_s else m.latency_s

        shared = {m.shape: m for m in self.shared_measurements}
        out = []
        for m in self.measurements:
            t = latency(m, False)
            rho = (neighbour_busy or {}).get(m.phase, 0.0)
            if rho and m.shape in shared:
                t += rho * (latency(shared[m.shape], True) - t)
            out.append(StageSample(m.phase, m.batch_size, m.tokens, t))
        return out

    def cpu_share(self, shared: bool = False) -> float | None:
        """Share of its `threads` cores the measuring process got over the (alone or shared) measurements:
        total CPU seconds / total wall seconds / threads (None when CPU time was not recorded)."""
        ms = [m for m in (self.shared_measurements if shared else self.measurements) if m.cpu_s is not None]
        if not ms:
            return None
        return sum(m.cpu_s or 0.0 for m in ms) / sum(m.latency_s for m in ms) / self.device.threads

    def kv_link_gbs(self, compression: Compression | str = Compression.NONE) -> float | None:
        """Effective bandwidth (GB/s) of the KV path between two local workers for `compression`.

        The simulator moves kv_bytes(model, tokens, compression) over a link; this is the bandwidth at which
        that takes the measured encode + transfer + decode time (summed over the measured sizes, so larger
        caches weigh more). None when the path was not measured for that codec.
        """
        c = Compression(compression)
        ms = [k for k in self.kv if k.method == c.value and k.path_s is not None]
        if not ms:
            return None
        moved = sum(kv_bytes(self.model, k.tokens, c) for k in ms)
        return moved / sum(k.path_s or 0.0 for k in ms) / 1e9

    def device_spec(self) -> GpuSpec:
        """The device as a GpuSpec (measured peaks; factors default until calibrated)."""
        d = self.device
        return GpuSpec(name=d.gpu_type, memory_gb=d.memory_gb, fp16_tflops=d.peak_tflops,
                       memory_bandwidth_gbs=d.memory_bandwidth_gbs, intra_node_gbs=d.memory_bandwidth_gbs,
                       price_usd_per_hour=0.0)


def _pool_measurements(groups: Sequence[Sequence[Measurement]]) -> tuple[Measurement, ...]:
    samples: dict[tuple[PassKind, int, int], list[float]] = {}
    for ms in groups:
        for m in ms:
            samples.setdefault(m.shape, []).extend(m.samples_s or (m.latency_s,))
    cpu: dict[tuple[PassKind, int, int], list[float]] = {}
    for ms in groups:
        for m in ms:
            if m.cpu_s is not None:
                cpu.setdefault(m.shape, []).append(m.cpu_s)
    return tuple(Measurement(phase=k, batch_size=b, tokens=t, latency_s=statistics.median(v), samples_s=tuple(v),
                             cpu_s=statistics.median(cpu[(k, b, t)]) if (k, b, t) in cpu else None)
                 for (k, b, t), v in samples.items())


def pool_profiles(profiles: Sequence[EngineProfile]) -> EngineProfile:
    """One profile from several sessions of the same engine on the same device (e.g. before and after a run,
    so the medians reflect the machine's load over the whole window): every shape's timed samples are pooled
    and their median taken; KV costs are medians of the sessions' medians; device peaks the best seen."""
    if not profiles:
        raise ValueError("no profiles to pool")
    first = profiles[0]
    for p in profiles[1:]:
        if (p.model, p.device.kind, p.device.threads, p.device.dtype, p.neighbours) != \
                (first.model, first.device.kind, first.device.threads, first.device.dtype, first.neighbours):
            raise ValueError("profiles to pool must share model, device kind, threads, dtype and neighbours")
    kv: dict[tuple[str, int], list[KvMeasurement]] = {}
    for p in profiles:
        for k in p.kv:
            kv.setdefault((k.method, k.tokens), []).append(k)
    pooled_kv = []
    for ks in kv.values():
        transfers = [k.transfer_s for k in ks if k.transfer_s is not None]
        pooled_kv.append(ks[0].model_copy(update={
            "encode_s": statistics.median(k.encode_s for k in ks), "decode_s": statistics.median(k.decode_s for k in ks),
            "transfer_s": statistics.median(transfers) if transfers else None}))
    device = first.device.model_copy(update={"peak_tflops": max(p.device.peak_tflops for p in profiles),
                                             "memory_bandwidth_gbs": max(p.device.memory_bandwidth_gbs
                                                                         for p in profiles)})
    pooled = {"device": device, "repeats": sum(p.repeats for p in profiles),
              "measurements": _pool_measurements([p.measurements for p in profiles]),
              "shared_measurements": _pool_measurements([p.shared_measurements for p in profiles]),
              "kv": tuple(pooled_kv), "notes": tuple(dict.fromkeys(n for p in profiles for n in p.notes))}
    return EngineProfile(**{**dict(first), **pooled})


def parse_profile(text: str, source: str) -> EngineProfile:
    if not text.strip():
        raise SpecError("empty file (expected a thunderserve profile JSON)", source=source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(f"malformed JSON at line {exc.lineno}: {exc.msg}", source=source) from None
    if not isinstance(data, dict):
        raise SpecError("expected a JSON object (a thunderserve profile)", source=source)
    if data.get("format") != FORMAT:
        raise SpecError(f"not a thunderserve profile (format must be '{FORMAT}')", source=source, field="format")
    try:
        return EngineProfile.model_validate(data)
    except ValidationError as exc:
        field, msg = first_error(exc)
        raise SpecError(msg, source=source, field=field) from None


def load_profile(path: Path) -> EngineProfile:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError("file not found", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read file ({exc})", source=str(path)) from None
    return parse_profile(text, str(path))


def dump_profile(profile: EngineProfile) -> str:
    return json.dumps(profile.model_dump(mode="json"), indent=2) + "\n"
