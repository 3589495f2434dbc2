"""Prefill / decode / colocated workers: the state machine (`core`), its process shell (`server`), messages."""

from thunderserve.runtime.workers.core import KvHandoff, StepResult, WorkerCore
from thunderserve.runtime.workers.protocol import GenerateRequest, WorkerConfig, WorkerState
from thunderserve.runtime.workers.server import WorkerLaunchSpec, WorkerServer, serve_worker

__all__ = ["GenerateRequest", "KvHandoff", "StepResult", "WorkerConfig", "WorkerCore", "WorkerLaunchSpec",
           "WorkerServer", "WorkerState", "serve_worker"]
