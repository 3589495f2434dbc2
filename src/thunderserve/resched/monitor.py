"""Detection: sliding-window workload estimates and heartbeat-based failure detection (pure, clock injected).

`WorkloadMonitor` estimates the arrival rate and the prompt/output length distributions of the last `window_s`
seconds; `as_workload()` turns the window into a WorkloadSpec the planner can re-plan for. Two ways to feed it:

  * by request (`observe_arrival(..., request=id)`, `observe_completion(..., request=id)`, and at estimate
    time the tokens each in-flight request has produced so far): the window is the requests that *arrived*
    in the last `window_s` seconds. A finished one's output length is known; an unfinished one's is right-
    censored (at least its tokens so far plus one). Output lengths are estimated by Kaplan-Meier over both,
    so right after a shift, when only the new mix's short answers have finished, long answers still count
    (the completions alone would underestimate the mean output by ~40% on chat traffic). Requests longer than
    every finished one get a geometric tail fitted to the longer half of the data (see `kaplan_meier`).
  * anonymously (no request ids): prompts of the arrivals and outputs of the completions seen in the last
    `window_s` seconds, as they come (biased towards short outputs after a shift; used by callers that only
    see finished requests).

`HeartbeatTracker` declares a worker dead when no heartbeat arrived for `timeout_s`; transport errors report a
death at once (`report_failure`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from thunderserve.spec.workload import WorkloadSpec

DEFAULT_WINDOW_S = 120.0
MIN_SAMPLES = 10  # arrivals and completions a window needs before it gives an estimate
IMPUTE_SEED = 0  # censored outputs are drawn from the KM distribution with this seed (deterministic)


@dataclass(frozen=True)
class WorkloadEstimate:
    rate_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    num_arrivals: int
    num_completions: int
    # standard errors of the two means (sampling noise of the window: heavy-tailed lengths make it large)
    prompt_se_tokens: float = 0.0
    output_se_tokens: float = 0.0


@dataclass(frozen=True)
class InFlight:
    """A request accepted and not yet ended, as a deployment reports it: its output is right-censored."""

    arrival_s: float
    prompt_tokens: int
    completion_tokens: int  # tokens produced so far


@dataclass(frozen=True)
class OutputDistribution:
    """A discrete output-length distribution (Kaplan-Meier): `tokens[i]` has probability `mass[i]`."""

    tokens: np.ndarray  # increasing, int64
    mass: np.ndarray  # sums to 1

    @property
    def mean(self) -> float:
        return float(self.tokens @ self.mass)

    @property
    def std(self) -> float:
        return float(np.sqrt(max(float((self.tokens.astype(float) - self.mean) ** 2 @ self.mass), 0.0)))


def tail_residual_tokens(exact: np.ndarray, at_least: np.ndarray) -> float:
    """Expected tokens beyond its bound of a request that outlived every finished one, under a geometric
    (constant-hazard) tail fitted by maximum likelihood to the upper half of the data: lengths from the median
    finished length on, where each finished request is a stop after its tokens there and each censored one
    survived its tokens there. 0 when no request stopped in that range (nothing to fit: keep the bound)."""
    if exact.size == 0:
        return 0.0
    q = int(np.median(exact))
    upper = exact[exact >= q]
    trials = float(np.sum(upper - q + 1) + np.sum(np.maximum(at_least - q, 0)))
    if upper.size == 0 or trials <= 0:
        return 0.0
    hazard = min(upper.size / trials, 1.0)
    return (1.0 - hazard) / hazard


def kaplan_meier(exact: np.ndarray, at_least: np.ndarray) -> OutputDistribution:
    """Output lengths from exact observations and right-censored ones (`at_least[j]`: the length is >= it).

    A censored observation is at risk for every length up to its bound. Within the lengths some request
    finished at, this is the Kaplan-Meier estimate (unbiased when how long a request has run so far does not
    depend on its length). The survival mass left after the last finished length belongs to requests longer
    than any finished one; each such survivor keeps an equal share, placed at its bound plus the mean residual
    length of a geometric tail fitted to the upper half of the data (`tail_residual_tokens`). Right after a
    shift, when a short window has seen few long answers finish, this tail carries much of the mean. Needs at
    least one observation.
    """
    exact = np.asarray(exact, dtype=np.int64)
    at_least = np.asarray(at_least, dtype=np.int64)
    if exact.size + at_least.size == 0:
        raise ValueError("kaplan_meier needs at least one observation")
    values, deaths = np.unique(exact, return_counts=True)
    ex_sorted = np.sort(exact)
    cen_sorted = np.sort(at_least)
    # at risk at length v: exact >= v, and censored with bound >= v (the length may still equal v)
    at_risk = (ex_sorted.size - np.searchsorted(ex_sorted, values, side="left")
               + cen_sorted.size - np.searchsorted(cen_sorted, values, side="left"))
    survival = np.cumprod(1.0 - deaths / np.maximum(at_risk, 1))
    before = np.concatenate([[1.0], survival[:-1]])
    tail = float(survival[-1]) if survival.size else 1.0
    tokens = values.astype(np.int64)
    mass = before - survival
    if tail > 1e-12:  # survivors of the last finished length (all censored)
        last = int(values[-1]) if values.size else 0
        survivors = cen_sorted[cen_sorted >= last]
        residual = tail_residual_tokens(ex_sorted, cen_sorted)
        tokens = np.concatenate([tokens, np.rint(survivors + residual).astype(np.int64)])
        mass = np.concatenate([mass, np.full(survivors.size, tail / survivors.size)])
        tokens, inverse = np.unique(tokens, return_inverse=True)
        mass = np.bincount(inverse, weights=mass)
    return OutputDistribution(tokens, mass / mass.sum())


class WorkloadMonitor:
    """Sliding-window estimates of arrival rate and prompt/output lengths (see module docstring)."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self._arrivals: deque[tuple[float, int, Hashable | None]] = deque()  # (time, prompt, request)
        self._outputs: deque[tuple[float, int]] = deque()  # anonymous completions (time, output)
        self._done: dict[Hashable, int] = {}  # output length of finished requests still in the window
        self._ids: set[Hashable] = set()  # ids of the arrivals in the window
        self._first_s: float | None = None

    def observe_arrival(self, now_s: float, prompt_tokens: int, request: Hashable | None = None) -> None:
        if self._first_s is None:
            self._first_s = now_s
        self._arrivals.append((now_s, prompt_tokens, request))
        if request is not None:
            self._ids.add(request)
        self._trim(now_s)

    def observe_completion(self, now_s: float, output_tokens: int, request: Hashable | None = None) -> None:
        """A finished request: by id (its arrival was observed with that id; ignored once that arrival left the
        window), or anonymously."""
        if request is None:
            self._outputs.append((now_s, output_tokens))
        elif request in self._ids:
            self._done[request] = output_tokens
        self._trim(now_s)

    def _trim(self, now_s: float) -> None:
        cutoff = now_s - self.window_s
        while self._outputs and self._outputs[0][0] < cutoff:
            self._outputs.popleft()
        while self._arrivals and self._arrivals[0][0] < cutoff:
            _, _, rid = self._arrivals.popleft()
            if rid is not None:
                self._done.pop(rid, None)
                self._ids.discard(rid)

    def _by_request(self) -> bool:
        return any(rid is not None for _, _, rid in self._arrivals)

    def output_distribution(self, now_s: float, in_flight: Mapping[Any, int] | None = None
                            ) -> OutputDistribution | None:
        """Kaplan-Meier output lengths of the requests that arrived in the window (by-request feeding);
        `in_flight[request]` = tokens it produced so far (missing: none yet). None without enough data."""
        self._trim(now_s)
        exact, censored = self._split(in_flight or {})
        if len(self._arrivals) < MIN_SAMPLES or exact.size < MIN_SAMPLES:
            return None
        return kaplan_meier(exact, censored)

    def _split(self, in_flight: Mapping[Any, int]) -> tuple[np.ndarray, np.ndarray]:
        exact = [self._done[rid] for _, _, rid in self._arrivals if rid in self._done]
        censored = [in_flight.get(rid, 0) + 1 for _, _, rid in self._arrivals
                    if rid is not None and rid not in self._done]
        return np.asarray(exact, dtype=np.int64), np.asarray(censored, dtype=np.int64)

    def estimate(self, now_s: float, in_flight: Mapping[Any, int] | None = None) -> WorkloadEstimate | None:
        """None until the window holds enough data (`MIN_SAMPLES` arrivals and completions)."""
        self._trim(now_s)
        if self._first_s is None or len(self._arrivals) < MIN_SAMPLES:
            return None
        span = min(self.window_s, max(now_s - self._first_s, 1e-9))
        prompts = np.asarray([p for _, p, _ in self._arrivals], dtype=float)
        n = prompts.size
        if self._by_request():
            dist = self.output_distribution(now_s, in_flight)
            if dist is None:
                return None
            # SE as if all n lengths were observed (censoring adds some; the trigger's margin covers it)
            mean_out, se_out = dist.mean, dist.std / np.sqrt(n)
            completions = sum(1 for _, _, rid in self._arrivals if rid in self._done)
        else:
            if len(self._outputs) < MIN_SAMPLES:
                return None
            outs = np.asarray([o for _, o in self._outputs], dtype=float)
            mean_out, se_out, completions = float(outs.mean()), float(outs.std() / np.sqrt(outs.size)), outs.size
        return WorkloadEstimate(rate_rps=n / span, mean_prompt_tokens=float(prompts.mean()),
                                mean_output_tokens=mean_out, num_arrivals=n, num_completions=completions,
                                prompt_se_tokens=float(prompts.std() / np.sqrt(n)), output_se_tokens=float(se_out))

    def as_workload(self, now_s: float, name: str = "observed", in_flight: Mapping[Any, int] | None = None
                    ) -> WorkloadSpec | None:
        """The window as a workload. By request: each arrival keeps its prompt, with its output length if it
        finished, else one drawn from the KM distribution above its bound. Anonymously: observed prompts
        paired with observed outputs (resampled to match)."""
        self._trim(now_s)
        if len(self._arrivals) < MIN_SAMPLES:
            return None
        times = np.array([t for t, _, _ in self._arrivals]) - self._arrivals[0][0]
        prompts = np.array([p for _, p, _ in self._arrivals], dtype=np.int64)
        if self._by_request():
            dist = self.output_distribution(now_s, in_flight)
            if dist is None:
                return None
            outputs = self._impute(dist, in_flight or {})
        else:
            if len(self._outputs) < MIN_SAMPLES:
                return None
            outs = np.array([o for _, o in self._outputs], dtype=np.int64)
            outputs = outs[np.arange(prompts.size) % outs.size]
        return WorkloadSpec(name=name, arrival_times_s=times, prompt_tokens=prompts, output_tokens=outputs)

    def _impute(self, dist: OutputDistribution, in_flight: Mapping[Any, int]) -> np.ndarray:
        rng = np.random.default_rng(IMPUTE_SEED)
        out = np.empty(len(self._arrivals), dtype=np.int64)
        for i, (_, _, rid) in enumerate(self._arrivals):
            if rid is not None and rid in self._done:
                out[i] = self._done[rid]
                continue
            bound = in_flight.get(rid, 0) + 1 if rid is not None else 1
            sel = dist.tokens >= bound
            if not sel.any():
                out[i] = bound
                continue
            m = dist.mass[sel]
            out[i] = int(rng.choice(dist.tokens[sel], p=m / m.sum()))
        return out


class HeartbeatTracker:
    """Failure detection by missed heartbeats (and by reported transport errors)."""

    def __init__(self, timeout_s: float = 3.0) -> None:
        self.timeout_s = timeout_s
        self._last: dict[str, float] = {}
        self._failed: set[str] = set()

    def beat(self, worker: str, now_s: float) -> None:
        if worker not in self._failed:
            self._last[worker] = now_s

    def report_failure(self, worker: str) -> None:
        """A transport error or a dead process: the worker is gone for good (a restart re-registers it)."""
        self._failed.add(worker)

    def forget(self, worker: str) -> None:
        self._last.pop(worker, None)
        self._failed.discard(worker)

    def dead(self, now_s: float) -> set[str]:
        late = {w for w, t in self._last.items() if now_s - t > self.timeout_s}
        return late | self._failed
