"""Scheduling for pt2serve: the model registry, the protocol-neutral data plane,
constant operations and the dynamic batcher. Free of any wire protocol."""

from pt2serve.scheduler.batcher import ModelScheduler, RunnerSlot, SchedulerStats
from pt2serve.scheduler.batches import Runner, RunResult
from pt2serve.scheduler.config import BatchingConfig, ModelConfig, fit_batching
from pt2serve.scheduler.constants import ConstantOps, ConstantUpdateResult, ConstantUpload
from pt2serve.scheduler.dataplane import DataPlane, Decode, InferenceOptions, InferenceResult, Ticket
from pt2serve.scheduler.manager import ModelManager
from pt2serve.scheduler.registry import LoadedModel, ModelRegistry
from pt2serve.scheduler.telemetry import NoTelemetry, Telemetry

__all__ = [
    "BatchingConfig",
    "ConstantOps",
    "ConstantUpdateResult",
    "ConstantUpload",
    "DataPlane",
    "Decode",
    "InferenceOptions",
    "InferenceResult",
    "LoadedModel",
    "ModelConfig",
    "ModelManager",
    "ModelRegistry",
    "ModelScheduler",
    "NoTelemetry",
    "Runner",
    "RunnerSlot",
    "RunResult",
    "SchedulerStats",
    "Telemetry",
    "Ticket",
    "fit_batching",
]
