"""Launching a plan's workers (local processes or Ray actors) and serving it over HTTP."""

from thunderserve.runtime.launch.base import (
    Launcher,
    LaunchError,
    WorkerEndpoint,
    check_servable,
    group_node,
    worker_specs,
)
from thunderserve.runtime.launch.local import LocalLauncher

__all__ = ["LaunchError", "Launcher", "LocalLauncher", "WorkerEndpoint", "check_servable", "group_node",
           "worker_specs"]
