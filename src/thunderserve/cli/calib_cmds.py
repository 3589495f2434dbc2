"""`calibrate`, `fidelity` and `profile`: fit the cost model to measurements and show how well it matches.

Other commands reuse `CalibrationOpt` + `calibrated_cluster(cluster, path)` to run on calibrated GPU factors:

    from thunderserve.cli.calib_cmds import CalibrationOpt, calibrated_cluster
    def plan(..., calibration: Path | None = CalibrationOpt): cluster = calibrated_cluster(cluster, calibration)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from thunderserve.cli.common import JsonOpt, console, out, print_json
from thunderserve.costmodel.calibration import (
    Calibration,
    GpuCalibration,
    SharedFactors,
    apply_calibration,
    default_calibration,
    dump_calibration,
    fit_engine_profile,
    fit_gpu_profiles,
    load_calibration,
    merge,
)
from thunderserve.errors import SpecError
from thunderserve.profiling.engine_profile import ProfileGrid
from thunderserve.profiling.fidelity import engine_fidelity, gemm_fidelity, points, summarize
from thunderserve.profiling.schema import EngineProfile, dump_profile, load_profile
from thunderserve.profiling.step_fidelity import step_fidelity, vidur_published_steps
from thunderserve.profiling.vidur import (
    ProfileData,
    discover,
    load_profiles,
    packaged_profiles_dir,
    parse_map,
)
from thunderserve.profiling.vidur_ops import read_op_terms
from thunderserve.spec.cluster import Cluster

CalibrationOpt = typer.Option(None, "--calibration",
                              help="Calibration JSON from `thunderserve calibrate` (default: the built-in fit)")
GpuMapOpt = typer.Option(None, "--gpu-map", help="Profile folder -> catalog GPU, e.g. a100=A100-80GB,a40=A40")
ModelMapOpt = typer.Option(None, "--model-map", help="Model folder -> catalog model, e.g. Llama-2-7b-hf=llama-2-7b")
GpusOpt = typer.Option(None, "--gpus", help="Use only these GPU folders or types (comma-separated)")


def load_calibration_option(path: Path | None) -> Calibration:
    """The calibration a --calibration option names, or the built-in default."""
    return load_calibration(path) if path is not None else default_calibration()


def calibrated_cluster(cluster: Cluster, path: Path | None) -> Cluster:
    """Apply --calibration FILE to a resolved cluster; without a file the catalog factors (already calibrated by
    the built-in fit) are kept unchanged."""
    return cluster if path is None else apply_calibration(cluster, load_calibration(path))


def _csv_list(text: str | None) -> list[str] | None:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    return items or None


def _source_label(root: Path) -> str:
    try:
        if root.resolve() == packaged_profiles_dir().resolve():
            return "thunderserve:data/profiles/vidur"
    except OSError:
        pass
    return str(root)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def read_profile_dirs(dirs: Sequence[Path], gpus: list[str] | None, gpu_map: dict[str, str],
                      model_map: dict[str, str]) -> ProfileData:
    """Discover and read every Vidur profile under `dirs`, with a progress bar."""
    files = [f for d in dirs for f in discover(d, gpu_map, model_map, gpus)]
    with _progress() as bar:
        task = bar.add_task("reading profiles", total=len(files))
        return load_profiles(files, on_file=lambda _f: bar.advance(task))


def _factor_table(calib: Calibration) -> Table:
    t = Table(title="Fitted cost-model factors")
    for col in ("GPU type", "source", "compute eff", "memory eff", "sat. tokens", "op us", "layer us",
                "median err", "p90 err", "points"):
        t.add_column(col, justify="left" if col in ("GPU type", "source") else "right")
    rows: list[tuple[str, str, float, float, float, float | None, float, Any]] = []
    if calib.shared is not None:
        sh = calib.shared
        rows.append(("shared", f"fit on {', '.join(sh.fitted_on)}", sh.compute_efficiency, sh.memory_efficiency,
                     sh.compute_saturation_tokens, sh.op_overhead_us, sh.layer_overhead_us, sh.errors))
    for g in calib.gpus:
        s = g.spec
        rows.append((s.name, g.source, s.compute_efficiency, s.memory_efficiency, s.compute_saturation_tokens,
                     g.op_overhead_us, s.layer_overhead_us, g.errors))
    for name, src, ce, me, sat, op, layer, err in rows:
        t.add_row(name, src, f"{ce:.3f}", f"{me:.3f}", f"{sat:.1f}", "-" if op is None else f"{op:.2f}",
                  f"{layer:.1f}", f"{err.median_relative_error:.1%}", f"{err.p90_relative_error:.1%}",
                  str(err.num_points))
    return t


def run_calibrate(profiles: Sequence[Path], engine_profiles: Sequence[Path], gpus: list[str] | None,
                  gpu_map: dict[str, str], model_map: dict[str, str]) -> Calibration:
    """Library entry of `calibrate`: fit GPU profiles (shared + per type) and engine profiles (pseudo types)."""
    if not profiles and not engine_profiles:
        raise SpecError("give --profiles DIR (Vidur GPU profiles) and/or --profile FILE (thunderserve profile)")
    shared: SharedFactors | None = None
    fitted: list[GpuCalibration] = []
    sources: list[str] = []
    if profiles:
        data = read_profile_dirs(profiles, gpus, gpu_map, model_map)
        specs = {f.gpu.name: f.gpu for f in data.files}
        with console.status("fitting GPU factors"):
            terms = read_op_terms(data.files)
            shared, fitted = fit_gpu_profiles(data.gemms, specs, data.elementwise_fixed_us, terms.elementwise,
                                              terms.attention)
        sources += [f"{_source_label(p)} ({', '.join(sorted({f.gpu.name for f in data.files}))})" for p in profiles]
    for path in engine_profiles:
        prof = load_profile(path)
        try:
            fitted.append(fit_engine_profile(prof.model, prof.device_spec(), prof.samples()))
        except ValueError as exc:
            raise SpecError(str(exc), source=str(path), field="measurements") from None
        sources.append(str(path))
    return merge(shared, fitted, sources)


def _engine_points(calib: Calibration, prof: EngineProfile) -> dict[str, Any]:
    return engine_fidelity(calib, prof.model, prof.device_spec(), prof.samples())


def register(app: typer.Typer) -> None:
    @app.command()
    def calibrate(
        profiles: list[Path] = typer.Option([], "--profiles", help="Vidur profile tree(s): <gpu>/<org>/<model>/mlp.csv"),
        profile: list[Path] = typer.Option([], "--profile", help="Engine profile JSON(s) from `thunderserve profile`"),
        output: Path = typer.Option(..., "-o", "--output", help="Where to write the calibration JSON"),
        gpus: str | None = GpusOpt,
        gpu_map: str | None = GpuMapOpt,
        model_map: str | None = ModelMapOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Fit per-GPU-type efficiency factors (compute, memory, saturation, overheads) to measured latencies."""
        calib = run_calibrate(profiles, profile, _csv_list(gpus), parse_map(gpu_map, "--gpu-map"),
                              parse_map(model_map, "--model-map"))
        try:
            output.write_text(dump_calibration(calib))
        except OSError as exc:
            raise SpecError(f"cannot write ({exc.strerror})", source=str(output)) from None
        if as_json:
            print_json(calib)
        else:
            out.print(_factor_table(calib))
            out.print(f"wrote {output}")

    @app.command()
    def fidelity(
        calibration: Path | None = CalibrationOpt,
        profiles: list[Path] = typer.Option([], "--profiles",
                                            help="Vidur profile tree(s) to compare with (default: the shipped ones)"),
        profile: list[Path] = typer.Option([], "--profile", help="Engine profile JSON(s) to compare with"),
        gpus: str | None = GpusOpt,
        gpu_map: str | None = GpuMapOpt,
        model_map: str | None = ModelMapOpt,
        plot: Path | None = typer.Option(None, "--plot", help="Write a predicted-vs-measured scatter (PNG)"),
        with_points: bool = typer.Option(False, "--points", help="Include every point in the JSON"),
        as_json: bool = JsonOpt,
    ) -> None:
        """Predicted vs measured latency per operation and size (median / p90 relative error)."""
        calib = load_calibration_option(calibration)
        dirs = list(profiles) or ([] if profile else [packaged_profiles_dir()])
        result: dict[str, Any] = {}
        fid = None
        if dirs:
            data = read_profile_dirs(dirs, _csv_list(gpus), parse_map(gpu_map, "--gpu-map"),
                                     parse_map(model_map, "--model-map"))
            fid = gemm_fidelity(calib, data.gemms)
            result = summarize(fid)
            terms = read_op_terms(data.files, fit_gpus=[])
            result["steps"] = {"by_gpu_kind": step_fidelity(calib, terms.layer_ops, terms.attention_profiles),
                               "vidur_published": vidur_published_steps(calib)}
            if with_points:
                result["points"] = points(fid)
        engines = {str(p): _engine_points(calib, load_profile(p)) for p in profile}
        if engines:
            result["engine_profiles"] = engines
            if not dirs:  # engine-only report: its errors are the headline
                first = next(iter(engines.values()))
                result = {k: first[k] for k in ("num_points", "median_relative_error", "p90_relative_error",
                                                "mean_relative_error")} | result
        result["calibration"] = str(calibration) if calibration else "built-in (data/calibration/default.json)"
        if plot is not None:
            from thunderserve.profiling.plot import plot_fidelity

            eng = None
            if engines:
                pts = [p for e in engines.values() for p in e["points"]]
                eng = (np.array([p["measured_ms"] for p in pts]) * 1e-3,
                       np.array([p["predicted_ms"] for p in pts]) * 1e-3)
            plot_fidelity(fid, plot, engine=eng)
            result["plot"] = str(plot)
        if as_json:
            print_json(result)
            return
        _print_fidelity(result)

    register_profile(app)


def _print_fidelity(result: dict[str, Any]) -> None:
    if "by_gpu" in result:
        t = Table(title="Cost model vs measured GEMM latency")
        for col in ("GPU type", "factors", "median err", "p90 err", "points"):
            t.add_column(col, justify="left" if col in ("GPU type", "factors") else "right")
        for name, e in result["by_gpu"].items():
            t.add_row(name, e["basis"], f"{e['median_relative_error']:.1%}", f"{e['p90_relative_error']:.1%}",
                      str(e["num_points"]))
        out.print(t)
        out.print(f"overall: median {result['median_relative_error']:.1%}, p90 {result['p90_relative_error']:.1%} "
                  f"over {result['num_points']} points")
    steps = result.get("steps", {}).get("by_gpu_kind", {})
    if steps:
        t = Table(title="Step time (one layer) vs steps composed from measured kernels: median / p90 error")
        for col in ("GPU type", "attention", "prefill", "decode", "mixed"):
            t.add_column(col, justify="left" if col in ("GPU type", "attention") else "right")
        for name, e in steps.items():
            t.add_row(name, e["attention"], *(f"{e[k]['median_relative_error']:.1%} / {e[k]['p90_relative_error']:.1%}"
                                              for k in ("prefill", "decode", "mixed")))
        out.print(t)
    for path, e in result.get("engine_profiles", {}).items():
        out.print(f"{path}: median {e['median_relative_error']:.1%}, p90 {e['p90_relative_error']:.1%} "
                  f"over {e['num_points']} forward passes ({e['basis']} factors)")
    if "plot" in result:
        out.print(f"wrote {result['plot']}")



def _ints(text: str, field: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SpecError(f"expected comma-separated whole numbers, got '{text}'", field=field) from None
    if not values or any(v <= 0 for v in values):
        raise SpecError(f"expected positive whole numbers, got '{text}'", field=field)
    return values


def register_profile(app: typer.Typer) -> None:
    @app.command("profile")
    def profile_cmd(
        model: str = typer.Option("smollm2", "--model", help="Model directory / HF config path, or 'smollm2'"),
        device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
        output: Path = typer.Option(..., "-o", "--output", help="Where to write profile.json"),
        gpu_type: str | None = typer.Option(None, "--gpu-type",
                                            help="Name of the pseudo GPU type to fit (default: CPU / CUDA-LOCAL)"),
        prefill_batches: str = typer.Option("1,2,4", "--prefill-batches", help="Prefill batch sizes"),
        prompt_tokens: str = typer.Option("16,64,256", "--prompt-tokens", help="Prompt lengths (tokens)"),
        decode_batches: str = typer.Option("1,4,16,32", "--decode-batches", help="Decode batch sizes"),
        context_tokens: str = typer.Option("64,256", "--context-tokens", help="Decode context lengths (tokens)"),
        kv_tokens: str = typer.Option("256", "--kv-tokens", help="KV cache sizes for the codec cost (tokens)"),
        threads: int | None = typer.Option(None, "--threads", help="Torch intra-op threads (match serve --cpu-threads)"),
        warmup: int = typer.Option(1, "--warmup", min=0, help="Untimed runs per shape"),
        repeats: int = typer.Option(3, "--repeats", min=1, help="Timed runs per shape (the median is kept)"),
        as_json: bool = JsonOpt,
    ) -> None:
        """Measure the local engine: prefill and decode latency grids, KV codec cost, device peaks."""
        from thunderserve.profiling.run import run_profile

        grid = ProfileGrid(prefill_batch_sizes=_ints(prefill_batches, "--prefill-batches"),
                           prompt_tokens=_ints(prompt_tokens, "--prompt-tokens"),
                           decode_batch_sizes=_ints(decode_batches, "--decode-batches"),
                           context_tokens=_ints(context_tokens, "--context-tokens"),
                           kv_tokens=_ints(kv_tokens, "--kv-tokens"), warmup=warmup, repeats=repeats)
        with _progress() as bar:
            task = bar.add_task("profiling", total=grid.num_steps + 2)

            def step(label: str) -> None:
                bar.update(task, advance=1, description=label)

            prof = run_profile(model, device, grid, gpu_type=gpu_type, on_step=step, threads=threads)
        try:
            output.write_text(dump_profile(prof))
        except OSError as exc:
            raise SpecError(f"cannot write ({exc.strerror})", source=str(output)) from None
        if as_json:
            print_json(prof)
            return
        t = Table(title=f"{prof.engine} on {prof.device.name} ({prof.device.threads} threads, {prof.device.dtype})")
        for col in ("phase", "batch", "tokens", "median ms"):
            t.add_column(col, justify="right")
        for m in prof.measurements:
            t.add_row(m.phase.value, str(m.batch_size), str(m.tokens), f"{m.latency_s * 1e3:.2f}")
        out.print(t)
        for k in prof.kv:
            out.print(f"KV {k.method} {k.tokens} tokens: {k.raw_bytes} -> {k.encoded_bytes} bytes, "
                      f"encode {k.encode_s * 1e3:.2f} ms, decode {k.decode_s * 1e3:.2f} ms")
        out.print(f"device peaks: {prof.device.peak_tflops * 1e3:.1f} GFLOP/s, "
                  f"{prof.device.memory_bandwidth_gbs:.1f} GB/s; wrote {output}")
