"""Service-level objectives: TTFT and TPOT targets and the fraction of requests that must meet both."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_SLO_SCALE = 5.0  # see README "SLO": TTFT 5x the unloaded reference latency, TPOT DistServe's published target
DEFAULT_ATTAINMENT = 0.9


class SloSpec(BaseModel):
    """A request meets the SLO when its TTFT <= ttft_ms and its mean TPOT <= tpot_ms."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ttft_ms: float = Field(gt=0)
    tpot_ms: float = Field(gt=0)
    attainment_target: float = Field(default=DEFAULT_ATTAINMENT, gt=0, le=1)
    scale: float | None = None  # set when derived from the reference latency (informational)

    @property
    def ttft_s(self) -> float:
        return self.ttft_ms / 1e3

    @property
    def tpot_s(self) -> float:
        return self.tpot_ms / 1e3

    def scaled(self, factor: float) -> SloSpec:
        """Both targets multiplied by `factor` (used to find the tightest deadline a system meets)."""
        return SloSpec(ttft_ms=self.ttft_ms * factor, tpot_ms=self.tpot_ms * factor,
                       attainment_target=self.attainment_target,
                       scale=None if self.scale is None else self.scale * factor)
