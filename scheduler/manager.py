"""`ModelManager`: the models of one server and everything done with them, by job:

- `registry` (scheduler/registry.py): load, reload, unload, get; emits changes;
- `data` (scheduler/dataplane.py): inference, for every protocol;
- `constants` (scheduler/constants.py): weight staging, swaps and updates.

Protocol adapters take the part they need; the loader's read-only methods are here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import torch

from pt2serve.loader.package import CallSpec, load_metadata_from_package
from pt2serve.loader.schema import ConstantSpec
from pt2serve.scheduler.config import ModelConfig
from pt2serve.scheduler.constants import ConstantOps
from pt2serve.scheduler.dataplane import DataPlane, InferenceOptions, InferenceResult
from pt2serve.scheduler.registry import LoadedModel, ModelListener, ModelRegistry
from pt2serve.scheduler.telemetry import Telemetry


class ModelManager:
    def __init__(self, telemetry: Telemetry | None = None) -> None:
        self.registry = ModelRegistry(telemetry)
        self.data = DataPlane(self.registry)
        self.constants = ConstantOps(self.registry)

    @property
    def telemetry(self) -> Telemetry:
        return self.registry.telemetry

    @telemetry.setter
    def telemetry(self, telemetry: Telemetry) -> None:
        self.registry.telemetry = telemetry

    # ------------------------------------------------------------ registry
    def on_change(self, listener: ModelListener) -> None:
        self.registry.on_change(listener)

    async def load(self, config: ModelConfig) -> LoadedModel:
        return await self.registry.load(config)

    async def unload(self, name: str, grace_s: float = 5.0) -> None:
        await self.registry.unload(name, grace_s)

    async def close(self, grace_s: float = 0.0) -> None:
        await self.registry.close(grace_s)

    def get(self, name: str) -> LoadedModel:
        return self.registry.get(name)

    def models(self) -> list[LoadedModel]:
        return self.registry.models()

    async def infer(
        self, name: str, inputs: Mapping[str, torch.Tensor], options: InferenceOptions | None = None
    ) -> InferenceResult:
        """Inference from Python (embedding, tests): the data plane without a wire."""
        return await self.data.infer(name, lambda: (inputs, options or InferenceOptions()))

    # ------------------------------------------------------ loader methods
    def get_metadata(self, name: str) -> dict[str, str]:
        return self.get(name).bindings[0].get_metadata()

    def get_call_spec(self, name: str) -> CallSpec:
        return self.get(name).bindings[0].get_call_spec()

    def get_constants(self, name: str) -> list[ConstantSpec]:
        return self.get(name).bindings[0].constant_specs()

    @staticmethod
    async def load_metadata_from_package(path: str, model_name: str) -> dict[str, str]:
        return await asyncio.to_thread(load_metadata_from_package, path, model_name)
