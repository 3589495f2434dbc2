"""User-facing errors: one clear line naming the bad field or file; the CLI maps them to exit code 2."""

from __future__ import annotations


class ThunderServeError(Exception):
    """Base for every error a user can cause (bad input, infeasible request). Never a bug."""


class SpecError(ThunderServeError):
    """A spec file or value is invalid; the message names the file and field."""

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        where = ""
        if source:
            where = f"{source}: "
        if field:
            where += f"{field}: "
        super().__init__(f"{where}{message}")
        self.source = source
        self.field = field


class PlanError(ThunderServeError):
    """A plan is malformed or does not fit the cluster/model."""


class InfeasibleError(ThunderServeError):
    """No deployment satisfies the request (e.g. the model cannot fit on the whole cluster)."""
