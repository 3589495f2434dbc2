"""Workloads: an arrival process plus prompt/output length distributions.

Presets `coding` and `conversation` are the Azure LLM inference traces of 2023 (CC-BY 4.0), shipped in
`thunderserve/data/traces/` (see ATTRIBUTION.md there). Any trace CSV works too, in one of these layouts:
  - `arrived_at,num_prefill_tokens,num_decode_tokens` (seconds; Vidur/Splitwise processed traces)
  - `TIMESTAMP,ContextTokens,GeneratedTokens` (raw Azure 2023/2024; timestamps as dates or seconds)
  - `Timestamp,...,Request tokens,Response tokens,...` (BurstGPT)
Bad rows are reported with their line number.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path

import numpy as np

from thunderserve.errors import SpecError

PRESETS = {"coding": "azure_code_2023.csv", "conversation": "azure_conv_2023.csv"}

_LAYOUTS: list[tuple[str, str, str]] = [
    ("arrived_at", "num_prefill_tokens", "num_decode_tokens"),
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    ("Timestamp", "Request tokens", "Response tokens"),
]


@dataclass(frozen=True)
class WorkloadSpec:
    """Requests as a trace: arrival times (s, from 0) and token counts; Poisson replays resample lengths."""

    name: str
    arrival_times_s: np.ndarray = field(repr=False)  # sorted, starting at 0
    prompt_tokens: np.ndarray = field(repr=False)  # int, >= 1
    output_tokens: np.ndarray = field(repr=False)  # int, >= 1

    @property
    def num_requests(self) -> int:
        return int(self.prompt_tokens.size)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_times_s[-1]) if self.num_requests > 1 else 0.0

    @property
    def trace_rate_rps(self) -> float:
        """The trace's own mean arrival rate."""
        return self.num_requests / self.duration_s if self.duration_s > 0 else 1.0

    @property
    def mean_prompt_tokens(self) -> float:
        return float(self.prompt_tokens.mean())

    @property
    def mean_output_tokens(self) -> float:
        return float(self.output_tokens.mean())

    def with_lengths(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray, name: str | None = None
                     ) -> WorkloadSpec:
        return WorkloadSpec(name or self.name, self.arrival_times_s[: prompt_tokens.size],
                            prompt_tokens, output_tokens)

    def poisson_requests(self, rate_rps: float, duration_s: float, seed: int = 0
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Poisson arrivals at `rate_rps` for `duration_s`, (prompt, output) pairs sampled jointly from the trace."""
        if rate_rps <= 0:
            raise SpecError("rate must be positive", field="rate")
        rng = np.random.default_rng(seed)
        n_guess = int(rate_rps * duration_s * 1.2 + 50)
        gaps = rng.exponential(1.0 / rate_rps, size=n_guess)
        times = np.cumsum(gaps)
        while times[-1] < duration_s:
            more = np.cumsum(rng.exponential(1.0 / rate_rps, size=n_guess)) + times[-1]
            times = np.concatenate([times, more])
        times = times[times < duration_s]
        idx = rng.integers(0, self.num_requests, size=times.size)
        return times, self.prompt_tokens[idx], self.output_tokens[idx]

    def trace_requests(self, rate_scale: float = 1.0, duration_s: float | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The trace's own timestamps, compressed by `rate_scale` (2.0 = twice as fast)."""
        times = self.arrival_times_s / rate_scale
        keep = times < duration_s if duration_s is not None else np.ones(times.size, bool)
        return times[keep], self.prompt_tokens[keep], self.output_tokens[keep]


def _parse_time(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    text = value.strip()
    if "." in text:  # Azure writes 7 fractional digits; datetime takes at most 6
        head, frac = text.split(".", 1)
        frac = "".join(ch for ch in frac if ch.isdigit())[:6]
        text = f"{head}.{frac}"
    return datetime.fromisoformat(text).timestamp()


def read_trace(path: Path, name: str | None = None) -> WorkloadSpec:
    """Load a trace CSV in any supported layout; the first bad row raises a SpecError with its line number."""
    source = str(path)
    try:
        handle = path.open(newline="")
    except FileNotFoundError:
        raise SpecError("file not found", source=source) from None
    with handle:
        reader = csv.reader(handle)
        header = [h.strip() for h in next(reader, [])]
        cols = next((lay for lay in _LAYOUTS if all(c in header for c in lay)), None)
        if cols is None:
            wanted = " | ".join(",".join(lay) for lay in _LAYOUTS)
            raise SpecError(f"unrecognised CSV header {header!r}; expected columns {wanted}", source=source)
        it, ip, io = (header.index(c) for c in cols)
        times: list[float] = []
        prompts: list[int] = []
        outputs: list[int] = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                t = _parse_time(row[it])
                p, o = int(float(row[ip])), int(float(row[io]))
            except (ValueError, IndexError):
                raise SpecError(f"line {lineno}: cannot parse row {row!r}", source=source) from None
            if p < 1 or o < 0 or not np.isfinite(t):
                raise SpecError(f"line {lineno}: token counts must be positive, got prompt={p} output={o}",
                                source=source)
            times.append(t)
            prompts.append(p)
            outputs.append(max(o, 1))
    if not times:
        raise SpecError("trace has no requests", source=source)
    t_arr = np.asarray(times, dtype=float)
    order = np.argsort(t_arr, kind="stable")
    t_arr = t_arr[order] - t_arr[order][0]
    return WorkloadSpec(
        name=name or path.stem,
        arrival_times_s=t_arr,
        prompt_tokens=np.asarray(prompts, dtype=np.int64)[order],
        output_tokens=np.asarray(outputs, dtype=np.int64)[order],
    )


def load_workload(ref: str) -> WorkloadSpec:
    """A preset name (`coding`, `conversation`) or a trace CSV path."""
    if ref in PRESETS:
        res = resources.files("thunderserve").joinpath(f"data/traces/{PRESETS[ref]}")
        with resources.as_file(res) as p:
            return read_trace(Path(p), name=ref)
    path = Path(ref)
    if not path.exists():
        raise SpecError(f"no such file or workload preset (presets: {', '.join(PRESETS)})", source=ref)
    return read_trace(path)
