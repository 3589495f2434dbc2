"""Decision code with no I/O, shared by the simulator and the runtime (one implementation, two drivers)."""

from thunderserve.policy.batching import (
    BatchingConfig,
    admit_decodes,
    plan_chunked_step,
    select_prefill_batch,
)
from thunderserve.policy.routing import WeightedChooser

__all__ = ["BatchingConfig", "WeightedChooser", "admit_decodes", "plan_chunked_step", "select_prefill_batch"]
