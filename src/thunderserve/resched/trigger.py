"""When to re-plan for a workload shift: a hysteresis state machine (pure; time is passed in).

Fire when the planned mix no longer fits, for `hold_s` seconds in a row:
  - the observed mean prompt or output length drifts more than `enter_drift` (relative) from what the plan was
    made for, beyond `noise_z` standard errors of the observed mean (a window of heavy-tailed lengths, e.g.
    coding answers with a standard deviation twice their mean, moves its mean by ~10% from one minute to the
    next at 10 req/s: sampling noise is not a shift), or
  - the plan's predicted SLO attainment at the observed workload falls below the target (when a predictor is
    given).
After firing, the observed workload becomes the new baseline, and the trigger stays quiet for `cooldown_s`.
It re-arms only once the drift is back under `exit_drift` (< enter_drift) relative to the new baseline, so a
steady load, or noise around a threshold, never makes the deployment flip back and forth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from thunderserve.resched.monitor import WorkloadEstimate

ENTER_DRIFT = 0.30
EXIT_DRIFT = 0.15
NOISE_Z = 2.0  # standard errors of the observed mean discounted from a drift
HOLD_S = 20.0
COOLDOWN_S = 120.0


@dataclass
class ShiftTrigger:
    """Mutable detector state (a `*State`-style object): feed it estimates, it says when to re-plan."""

    baseline: WorkloadEstimate
    attainment_target: float = 0.9
    predict_attainment: Callable[[WorkloadEstimate], float] | None = None
    enter_drift: float = ENTER_DRIFT
    exit_drift: float = EXIT_DRIFT
    hold_s: float = HOLD_S
    cooldown_s: float = COOLDOWN_S
    noise_z: float = NOISE_Z
    _bad_since: float | None = field(default=None, init=False)
    _quiet_until: float = field(default=float("-inf"), init=False)
    _armed: bool = field(default=True, init=False)
    fired_at: list[float] = field(default_factory=list, init=False)

    def drift(self, observed: WorkloadEstimate) -> float:
        """Largest relative change of the mean prompt or output length versus the baseline, less `noise_z`
        standard errors of the difference (so within the windows' sampling noise it is 0)."""
        b = self.baseline
        z = self.noise_z

        def rel(obs: float, se_obs: float, base: float, se_base: float) -> float:
            return max(abs(obs - base) - z * math.hypot(se_obs, se_base), 0.0) / max(base, 1.0)

        return max(rel(observed.mean_prompt_tokens, observed.prompt_se_tokens, b.mean_prompt_tokens,
                       b.prompt_se_tokens),
                   rel(observed.mean_output_tokens, observed.output_se_tokens, b.mean_output_tokens,
                       b.output_se_tokens))

    def update(self, now_s: float, observed: WorkloadEstimate | None) -> bool:
        """True exactly when a re-plan should start now."""
        if observed is None:
            return False
        drift = self.drift(observed)
        if not self._armed and drift < self.exit_drift:
            self._armed = True
        unfit = self.predict_attainment is not None and \
            self.predict_attainment(observed) < self.attainment_target
        bad = self._armed and (drift > self.enter_drift or unfit)
        if not bad or now_s < self._quiet_until:
            self._bad_since = None if not bad else self._bad_since
            return False
        if self._bad_since is None:
            self._bad_since = now_s
        if now_s - self._bad_since < self.hold_s:
            return False
        self.fired_at.append(now_s)
        self.baseline = observed
        self._bad_since = None
        self._quiet_until = now_s + self.cooldown_s
        self._armed = False
        return True
