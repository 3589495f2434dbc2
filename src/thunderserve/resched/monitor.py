"""Detection: sliding-window workload estimates and heartbeat-based failure detection (pure, clock injected).

`WorkloadMonitor` keeps the last `window_s` seconds of arrivals (prompt lengths) and completions (output
lengths) and estimates the arrival rate and the length distributions; `as_workload()` turns the window into a
WorkloadSpec the planner can re-plan for. `HeartbeatTracker` declares a worker dead when no heartbeat arrived
for `timeout_s`; transport errors report a death at once (`report_failure`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from thunderserve.spec.workload import WorkloadSpec

DEFAULT_WINDOW_S = 120.0


@dataclass(frozen=True)
class WorkloadEstimate:
    rate_rps: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    num_arrivals: int
    num_completions: int


class WorkloadMonitor:
    """Sliding-window estimates of arrival rate and prompt/output lengths."""

    def __init__(self, window_s: float = DEFAULT_WINDOW_S) -> None:
        self.window_s = window_s
        self._arrivals: deque[tuple[float, int]] = deque()
        self._outputs: deque[tuple[float, int]] = deque()
        self._first_s: float | None = None

    def observe_arrival(self, now_s: float, prompt_tokens: int) -> None:
        if self._first_s is None:
            self._first_s = now_s
        self._arrivals.append((now_s, prompt_tokens))
        self._trim(now_s)

    def observe_completion(self, now_s: float, output_tokens: int) -> None:
        self._outputs.append((now_s, output_tokens))
        self._trim(now_s)

    def _trim(self, now_s: float) -> None:
        cutoff = now_s - self.window_s
        for q in (self._arrivals, self._outputs):
            while q and q[0][0] < cutoff:
                q.popleft()

    def estimate(self, now_s: float) -> WorkloadEstimate | None:
        """None until the window holds enough data (10 arrivals and 10 completions)."""
        self._trim(now_s)
        if len(self._arrivals) < 10 or len(self._outputs) < 10 or self._first_s is None:
            return None
        span = min(self.window_s, max(now_s - self._first_s, 1e-9))
        return WorkloadEstimate(
            rate_rps=len(self._arrivals) / span,
            mean_prompt_tokens=float(np.mean([p for _, p in self._arrivals])),
            mean_output_tokens=float(np.mean([o for _, o in self._outputs])),
            num_arrivals=len(self._arrivals),
            num_completions=len(self._outputs),
        )

    def as_workload(self, now_s: float, name: str = "observed") -> WorkloadSpec | None:
        """The window as a workload: observed prompts paired with observed outputs (resampled to match)."""
        self._trim(now_s)
        if len(self._arrivals) < 10 or len(self._outputs) < 10:
            return None
        times = np.array([t for t, _ in self._arrivals]) - self._arrivals[0][0]
        prompts = np.array([p for _, p in self._arrivals], dtype=np.int64)
        outs = np.array([o for _, o in self._outputs], dtype=np.int64)
        outputs = outs[np.arange(prompts.size) % outs.size]
        return WorkloadSpec(name=name, arrival_times_s=times, prompt_tokens=prompts, output_tokens=outputs)


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
