"""`ModelRegistry`: the models this server serves (load, reload, unload, get), each
bound to one or more devices behind its own scheduler. Listeners hear of every
change, whoever asked for it: health and readiness follow the registry."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pt2serve.loader.errors import (
    ModelExists,
    ModelNotFound,
    PackageError,
    Pt2ServeError,
    Unavailable,
    shown,
)
from pt2serve.loader.package import LoadOptions, ModelPackage
from pt2serve.loader.schema import ModelSchema
from pt2serve.loader.weights import open_weights
from pt2serve.scheduler.adaptive import Contention
from pt2serve.scheduler.batcher import ModelScheduler, RunnerSlot, SchedulerStats
from pt2serve.scheduler.config import BatchingConfig, ModelConfig, fit_batching
from pt2serve.scheduler.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__name__)
# Called with (model name, serving) when a model starts or stops serving.
ModelListener = Callable[[str, bool], Awaitable[None]]
# The metric label of requests for models that are not loaded: clients cannot mint labels.
UNKNOWN_MODEL_LABEL = "_unknown"


@dataclass(slots=True)
class RequestStats:
    """Requests answered since load: how many and their summed latency."""

    succeeded: int = 0
    succeeded_seconds: float = 0.0
    failed: int = 0
    failed_seconds: float = 0.0


@dataclass(eq=False)
class LoadedModel:
    config: ModelConfig
    bindings: list[ModelPackage]
    scheduler: ModelScheduler
    loaded_at: float = field(default_factory=time.time)
    # Wall-clock time the served constants last changed (0: as compiled).
    constants_updated_at: float = 0.0
    # The user's label for the served constants, and for those staged for a swap.
    constants_label: str = ""
    staged_label: str = ""
    # One constant operation at a time per model: staging, updates and swaps must
    # not interleave, or a swap could serve half of one upload.
    constants_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    requests: RequestStats = field(default_factory=RequestStats)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def schema(self) -> ModelSchema:
        return self.bindings[0].schema

    @property
    def batching(self) -> BatchingConfig:
        return self.scheduler.config

    @property
    def stats(self) -> SchedulerStats:
        return self.scheduler.stats

    @property
    def queue_depth(self) -> int:
        return self.scheduler.queue_depth

    @property
    def batches_in_flight(self) -> int:
        return self.scheduler.batches_in_flight

    @property
    def constants_version(self) -> int:
        return self.scheduler.constants_version

    @property
    def runners(self) -> int:
        """Batches that can compute at once, all devices together."""
        return self.config.runners_per_device * len(self.bindings)


class ModelRegistry:
    def __init__(self, telemetry: Telemetry | None = None) -> None:
        self.telemetry: Telemetry = telemetry or NoTelemetry()
        # Set by the service while a thread that feeds the schedulers is starved
        # for CPU; every model's adaptive batching reads it.
        self.contention = Contention()
        self._models: dict[str, LoadedModel] = {}
        self._loading: set[str] = set()
        self._closing = False
        self._listeners: list[ModelListener] = []

    def on_change(self, listener: ModelListener) -> None:
        """Call `listener(name, serving)` whenever a model starts or stops serving
        (load, reload, unload, shutdown), whoever asked for it."""
        self._listeners.append(listener)

    async def _notify(self, name: str, serving: bool) -> None:
        for listener in self._listeners:
            await listener(name, serving)

    # ------------------------------------------------------------- lookups
    def get(self, name: str) -> LoadedModel:
        if self._closing:
            raise Unavailable("the server is shutting down")
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {shown(name)} is not loaded; loaded models: {known}")
        return model

    def find(self, name: str) -> LoadedModel | None:
        return self._models.get(name)

    def models(self) -> list[LoadedModel]:
        return [self._models[n] for n in sorted(self._models)]

    def metric_label(self, name: str) -> str:
        return name if name in self._models else UNKNOWN_MODEL_LABEL

    # ----------------------------------------------------------- lifecycle
    async def load(self, config: ModelConfig) -> LoadedModel:
        if config.name in self._models:
            raise ModelExists(f"model {shown(config.name)} is already loaded")
        return await self._load(config, replace=False)

    async def reload(self, config: ModelConfig, grace_s: float = 5.0) -> LoadedModel:
        """Load `config` and serve it under its name, replacing the model of that name
        once the new one is ready. If the load fails, the old model keeps serving.
        Requests queued for the old model finish on it (within `grace_s`)."""
        return await self._load(config, replace=True, grace_s=grace_s)

    async def _load(self, config: ModelConfig, *, replace: bool, grace_s: float = 5.0) -> LoadedModel:
        if self._closing:
            raise Unavailable("the server is shutting down")
        if config.name in self._loading:
            raise ModelExists(f"model {shown(config.name)} is being loaded")
        self._loading.add(config.name)
        started = time.monotonic()
        try:
            model = await asyncio.to_thread(self._prepare, config)
            if self._closing:
                await _close_model(model, 0.0)
                raise Unavailable("the server is shutting down")
            model.scheduler.start()
            old = self._models.get(config.name) if replace else None
            self._models[config.name] = model
            log.info(
                "%s model %r from %s in %.1fs: devices %s, %d runner(s) each, max batch %d, schema %s",
                "reloaded" if old is not None else "loaded",
                config.name,
                config.package_path,
                time.monotonic() - started,
                list(config.device_indices),
                config.runners_per_device,
                model.batching.max_batch_size,
                model.schema.source,
            )
            self.telemetry.model_loaded(config.name, time.monotonic() - started, True)
        except BaseException:
            self.telemetry.model_loaded(config.name, time.monotonic() - started, False)
            raise
        finally:
            self._loading.discard(config.name)
        await self._notify(config.name, True)
        if old is not None:
            await _close_model(old, grace_s)
        return model

    def _prepare(self, config: ModelConfig) -> LoadedModel:
        """In a thread: load every binding, warm it up and build its scheduler (not
        yet started)."""
        bindings = [
            ModelPackage.load(
                config.package_path,
                LoadOptions(
                    config.model_name, config.run_single_threaded, config.num_runners, device, config.runtime
                ),
                config.schema,
            )
            for device in config.device_indices
        ]
        try:
            if config.weights:
                _load_weights(config, bindings)
            schema = _warm_up(config, bindings) if config.warmup else bindings[0].schema
            batching = fit_batching(schema, config.batching)
        except BaseException:
            for binding in bindings:
                binding.close()
            raise
        slots = [RunnerSlot(_HostRunner(b), config.runners_per_device, label=str(b.device)) for b in bindings]
        scheduler = ModelScheduler(
            config.name,
            slots,
            batching,
            batched=schema.batched,
            pad_to=schema.static_batch,
            telemetry=self.telemetry,
            contention=self.contention,
        )
        model = LoadedModel(config, bindings, scheduler)
        if config.weights:
            model.constants_label = config.weights_label
            model.constants_updated_at = time.time()
        return model

    async def unload(self, name: str, grace_s: float = 5.0) -> None:
        model = self.get(name)
        del self._models[name]
        await self._notify(name, False)
        await _close_model(model, grace_s)
        self.telemetry.model_unloaded(name)
        log.info("unloaded model %r", name)

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop every model: queued work gets `grace_s` to finish."""
        self._closing = True
        models = list(self._models.values())
        self._models.clear()
        for model in models:
            await self._notify(model.name, False)
        await asyncio.gather(*(_close_model(m, grace_s) for m in models))


class _HostRunner:
    """A binding as the scheduler's runner: host tensors in and out."""

    def __init__(self, package: ModelPackage) -> None:
        self.run = package.host_runner()


async def _close_model(model: LoadedModel, grace_s: float) -> None:
    await model.scheduler.close(grace_s)
    for binding in model.bindings:
        binding.close()


def _load_weights(config: ModelConfig, bindings: Sequence[ModelPackage]) -> None:
    """Serve the weights file of `config` on every binding (before the model serves)."""
    assert config.weights is not None
    constants = {s.fqn for s in bindings[0].constant_specs()}
    with open_weights(config.weights) as weights:
        tensors = {key: weights.get(key) for key in weights.keys() if key in constants}
    for binding in bindings:
        binding.load_constants(binding.on_device(tensors), use_inactive=False, check_full_update=True)
    log.info("model %r: serving the weights of %s (%s)", config.name, config.weights, config.weights_label)


def _warm_up(config: ModelConfig, bindings: Sequence[ModelPackage]) -> ModelSchema:
    """Run one batch of zeros on every binding; returns the schema with the outputs'
    dtypes and shapes filled in where the package left them unknown."""
    schema = bindings[0].schema
    inputs = schema.warmup_inputs()
    if inputs is None:
        log.info("model %r: no warm-up (an input's dtype or shape is unknown)", config.name)
        return schema
    started = time.monotonic()
    for binding in bindings:
        try:
            outputs = binding.run_on_host([t.clone() for t in inputs])
        except Pt2ServeError as exc:
            raise PackageError(
                f"model {shown(config.name)}: the warm-up run failed ({exc}); "
                "load it with warm-up off (warmup = false) to skip it"
            ) from exc
        binding.schema = schema = schema.with_outputs_of(outputs)
    log.info(
        "model %r: warm-up batch of %s on %d binding(s) in %.1f ms",
        config.name,
        [list(t.shape) for t in inputs],
        len(bindings),
        (time.monotonic() - started) * 1e3,
    )
    return schema
