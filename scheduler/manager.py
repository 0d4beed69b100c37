"""`ModelManager`: the models this server serves, each behind its own scheduler.

The servicer talks to this class only, in domain types. A model is bound to one
or more device indices; each binding is its own `ModelPackage` with
`num_runners` runners (one with `run_single_threaded`), and the model's scheduler
spreads batches over all of them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from pt2serve.loader.errors import (
    ErrorKind,
    ExecutionFailed,
    InvalidInput,
    ModelExists,
    ModelNotFound,
    PackageError,
    Pt2ServeError,
    Unavailable,
    shown,
)
from pt2serve.loader.package import CallSpec, LoadOptions, ModelPackage, load_metadata_from_package
from pt2serve.loader.schema import ConstantSpec, ModelSchema
from pt2serve.loader.weights import open_weights
from pt2serve.scheduler.batcher import BatchingConfig, ModelScheduler, RunnerSlot, RunResult
from pt2serve.scheduler.telemetry import NoTelemetry, Telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    package_path: str
    model_name: str = "model"
    run_single_threaded: bool = False
    num_runners: int = 1
    device_indices: tuple[int, ...] = (-1,)
    schema: ModelSchema | None = None
    batching: BatchingConfig | None = None  # None: defaults sized from the schema
    runtime: str = "native"  # or "binding": see loader.package.LoadOptions
    # Run one batch of zeros at load (like Triton's model warmup): the first client
    # does not pay the cold start, and outputs the package does not describe get
    # their dtype and shape from it.
    warmup: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInput("model name must not be empty")
        if not self.package_path:
            raise InvalidInput(f"model {shown(self.name)}: package_path must not be empty")
        if self.num_runners < 1:
            raise InvalidInput(f"model {shown(self.name)}: num_runners must be at least 1")
        if self.run_single_threaded and self.num_runners != 1:
            raise InvalidInput(
                f"model {shown(self.name)}: run_single_threaded runs one runner per device; "
                f"num_runners must be 1, got {self.num_runners}"
            )
        if not self.device_indices:
            raise InvalidInput(f"model {shown(self.name)}: device_indices must not be empty")


@dataclass(frozen=True, slots=True)
class InferenceResult:
    outputs: dict[str, torch.Tensor]
    constants_version: int


@dataclass(frozen=True, slots=True)
class PendingInference:
    """A queued request: wait for `future`, then `result()` names its outputs."""

    model: str
    future: asyncio.Future[RunResult]
    output_names: tuple[str, ...]
    wanted: frozenset[str]

    def result(self) -> InferenceResult:
        """The named outputs; raises the request's error. Call once `future` is done."""
        result = self.future.result()
        if len(result.outputs) != len(self.output_names):
            raise ExecutionFailed(
                f"model {self.model!r} returned {len(result.outputs)} outputs, "
                f"its schema names {len(self.output_names)}"
            )
        if not self.wanted:
            named = dict(zip(self.output_names, result.outputs, strict=True))
            return InferenceResult(named, result.constants_version)
        outputs = {n: t for n, t in zip(self.output_names, result.outputs, strict=True) if n in self.wanted}
        return InferenceResult(outputs, result.constants_version)


class _DeviceRunner:
    """Moves inputs to the binding's device and outputs back to the host."""

    def __init__(self, package: ModelPackage) -> None:
        self._package = package
        self._device = package.device

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self._device.type == "cpu":
            return self._package.run(inputs)
        moved = [t.to(self._device, non_blocking=True) for t in inputs]
        return [t.cpu() for t in self._package.run(moved)]


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
    requests: RequestStats = field(default_factory=lambda: RequestStats())

    @property
    def schema(self) -> ModelSchema:
        return self.bindings[0].schema

    @property
    def constants_version(self) -> int:
        return self.scheduler.constants_version

    @property
    def effective_runners(self) -> int:
        return 1 if self.config.run_single_threaded else self.config.num_runners


DEFAULT_MAX_BATCH = 64
UNKNOWN_MODEL_LABEL = "_unknown"
# Called with (model name, serving) when a model starts or stops serving.
ModelListener = Callable[[str, bool], Awaitable[None]]


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
            outputs = _DeviceRunner(binding).run([t.clone() for t in inputs])
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


def fit_batching(schema: ModelSchema, given: BatchingConfig | None) -> BatchingConfig:
    """Fit a batching config to what the package can run."""
    given = given or BatchingConfig()
    if not schema.batched:
        return replace(given, max_batch_size=1, max_rows_per_request=None, preferred_batch_sizes=())
    bound = schema.max_rows
    size = given.max_batch_size or min(bound or DEFAULT_MAX_BATCH, DEFAULT_MAX_BATCH)
    if bound is not None and size > bound:
        raise InvalidInput(f"max_batch_size {size} exceeds the package's bound of {bound} rows")
    if any(p > size for p in given.preferred_batch_sizes):
        raise InvalidInput(f"preferred_batch_sizes must not exceed max_batch_size {size}")
    return replace(given, max_batch_size=size)


class ModelManager:
    def __init__(self, telemetry: Telemetry | None = None) -> None:
        self.telemetry: Telemetry = telemetry or NoTelemetry()
        # Requests queued, and of those: answered (any outcome) and answered OK.
        self.accepted = 0
        self.answered = 0
        self.succeeded = 0
        self._models: dict[str, LoadedModel] = {}
        self._loading: set[str] = set()
        self._closing = False
        self._listeners: list[ModelListener] = []

    # ------------------------------------------------------------ lifecycle
    def on_change(self, listener: ModelListener) -> None:
        """Call `listener(name, serving)` whenever a model starts or stops serving
        (load, reload, unload, shutdown), whoever asked for it."""
        self._listeners.append(listener)

    async def _notify(self, name: str, serving: bool) -> None:
        for listener in self._listeners:
            await listener(name, serving)

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
                await self._close_model(model, 0.0)
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
                model.effective_runners,
                model.scheduler.config.max_batch_size,
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
            await self._close_model(old, grace_s)
        return model

    def _prepare(self, config: ModelConfig) -> LoadedModel:
        """Load every binding, warm it up and build its scheduler (not yet started)."""
        bindings = self._load_bindings(config)
        try:
            schema = bindings[0].schema
            if config.warmup:
                schema = _warm_up(config, bindings)
            batching = fit_batching(schema, config.batching)
        except BaseException:
            for binding in bindings:
                binding.close()
            raise
        slots = [
            RunnerSlot(
                _DeviceRunner(b), 1 if config.run_single_threaded else config.num_runners, label=str(b.device)
            )
            for b in bindings
        ]
        scheduler = ModelScheduler(
            config.name,
            slots,
            batching,
            batched=schema.batched,
            pad_to=schema.static_batch,
            telemetry=self.telemetry,
        )
        return LoadedModel(config, bindings, scheduler)

    @staticmethod
    def _load_bindings(config: ModelConfig) -> list[ModelPackage]:
        return [
            ModelPackage.load(
                config.package_path,
                LoadOptions(
                    config.model_name, config.run_single_threaded, config.num_runners, device, config.runtime
                ),
                config.schema,
            )
            for device in config.device_indices
        ]

    async def unload(self, name: str, grace_s: float = 5.0) -> None:
        model = self.get(name)
        del self._models[name]
        await self._notify(name, False)
        await self._close_model(model, grace_s)
        self.telemetry.model_unloaded(name)
        log.info("unloaded model %r", name)

    @staticmethod
    async def _close_model(model: LoadedModel, grace_s: float) -> None:
        await model.scheduler.close(grace_s)
        for binding in model.bindings:
            binding.close()

    async def close(self, grace_s: float = 0.0) -> None:
        """Stop every model: queued work gets `grace_s` to finish."""
        self._closing = True
        models = list(self._models.values())
        self._models.clear()
        for model in models:
            await self._notify(model.config.name, False)
        await asyncio.gather(*(self._close_model(m, grace_s) for m in models))

    def get(self, name: str) -> LoadedModel:
        if self._closing:
            raise Unavailable("the server is shutting down")
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise ModelNotFound(f"model {shown(name)} is not loaded; loaded models: {known}")
        return model

    def models(self) -> list[LoadedModel]:
        return [self._models[n] for n in sorted(self._models)]

    # ------------------------------------------------------------ inference
    def submit(
        self,
        name: str,
        inputs: Mapping[str, torch.Tensor],
        *,
        priority: int = 0,
        timeout_s: float | None = None,
        deadline: float | None = None,
        output_names: Sequence[str] = (),
        on_done: Callable[[PendingInference], None] | None = None,
    ) -> PendingInference:
        """Validate and queue a request without waiting (streams use this).

        Raises at once for a request that cannot be accepted; cancelling the
        returned future withdraws it if it has not started running. `on_done`, if
        given, is called on the loop once the future is done (also when cancelled),
        after the request is counted: one callback instead of a second one on the
        future, which matters at thousands of requests a second.
        """
        started = time.monotonic()
        try:
            model = self.get(name)
            schema = model.schema
            unknown = [n for n in output_names if n not in schema.output_names]
            if unknown:
                raise InvalidInput(
                    f"unknown output {shown(unknown[0])}; model {shown(name)} has outputs: "
                    f"{', '.join(schema.output_names)}"
                )
            ordered = schema.validate(inputs, row_limit=model.scheduler.config.row_limit)
            pending: PendingInference | None = None

            def done(future: asyncio.Future[RunResult]) -> None:
                try:
                    self._count_answer(name, started, future)
                finally:
                    if on_done is not None and pending is not None:
                        on_done(pending)

            future = model.scheduler.enqueue(
                ordered, priority=priority, timeout_s=timeout_s, deadline=deadline, on_done=done
            )
        except Pt2ServeError as exc:
            self.note_rejected(name, exc)
            raise
        self.accepted += 1
        pending = PendingInference(name, future, schema.output_names, frozenset(output_names))
        return pending

    def note_rejected(self, name: str, error: Pt2ServeError) -> None:
        """Count a request refused before it was queued (also by the wire layer)."""
        self.telemetry.request_finished(self.metric_label(name), error.kind, 0.0)

    def metric_label(self, name: str) -> str:
        # Only loaded models get their own series: clients cannot mint labels.
        return name if name in self._models else UNKNOWN_MODEL_LABEL

    def _count_answer(self, name: str, started: float, future: asyncio.Future[RunResult]) -> None:
        elapsed = time.monotonic() - started
        self.answered += 1
        if future.cancelled():
            self.telemetry.request_cancelled(name, elapsed)
            return
        error = future.exception()
        if error is None:
            self.succeeded += 1
        model = self._models.get(name)
        if model is not None:
            if error is None:
                model.requests.succeeded += 1
                model.requests.succeeded_seconds += elapsed
            else:
                model.requests.failed += 1
                model.requests.failed_seconds += elapsed
        kind = (
            None
            if error is None
            else (error.kind if isinstance(error, Pt2ServeError) else ErrorKind.INTERNAL)
        )
        self.telemetry.request_finished(name, kind, elapsed)

    async def infer(
        self,
        name: str,
        inputs: Mapping[str, torch.Tensor],
        *,
        priority: int = 0,
        timeout_s: float | None = None,
        deadline: float | None = None,
        output_names: Sequence[str] = (),
    ) -> InferenceResult:
        pending = self.submit(
            name, inputs, priority=priority, timeout_s=timeout_s, deadline=deadline, output_names=output_names
        )
        await pending.future
        return pending.result()

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

    def begin_constant_upload(
        self,
        name: str,
        *,
        by_fqn: bool,
        use_inactive: bool,
        full: bool,
        user_managed: bool = False,
        label: str = "",
    ) -> ConstantUpload:
        """Start an upload that receives constants one at a time (streams, files).

        Staged uploads (`use_inactive`) copy each constant into the inactive buffer
        as it arrives, without pausing inference, so the server holds at most one
        incoming constant besides the two buffers. Served uploads collect the
        constants and apply them all at once between batches.
        """
        operation = "load_constants" if by_fqn else "update_constant_buffer"
        return ConstantUpload(
            self, self.get(name), operation, by_fqn, use_inactive, full, user_managed, label
        )

    async def load_constants(
        self,
        name: str,
        constants: Mapping[str, torch.Tensor],
        *,
        use_inactive: bool,
        check_full_update: bool,
        user_managed: bool = False,
        label: str = "",
    ) -> ConstantUpdateResult:
        """`load_constants` by FQN on every binding."""
        upload = self.begin_constant_upload(
            name,
            by_fqn=True,
            use_inactive=use_inactive,
            full=check_full_update,
            user_managed=user_managed,
            label=label,
        )
        return await upload.run(constants)

    async def update_constant_buffer(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        use_inactive: bool,
        validate_full_updates: bool,
        user_managed: bool = False,
        label: str = "",
    ) -> ConstantUpdateResult:
        """`update_constant_buffer` by internal name on every binding."""
        upload = self.begin_constant_upload(
            name,
            by_fqn=False,
            use_inactive=use_inactive,
            full=validate_full_updates,
            user_managed=user_managed,
            label=label,
        )
        return await upload.run(tensors)

    async def load_constants_from_file(
        self, name: str, path: str, *, use_inactive: bool, full: bool, swap: bool, label: str = ""
    ) -> tuple[ConstantUpdateResult, list[str]]:
        """load_constants from a weight file, one tensor at a time. Entries that are
        not constants of the model (folded or absent) are skipped and listed."""
        model = self.get(name)
        constants = {s.fqn for s in model.bindings[0].constant_specs()}
        upload = self.begin_constant_upload(
            name, by_fqn=True, use_inactive=use_inactive, full=full, label=label
        )
        ignored: list[str] = []
        async with upload:
            with open_weights(path) as weights:
                for key in await asyncio.to_thread(weights.keys):
                    if key not in constants:
                        ignored.append(key)
                        continue
                    await upload.add(key, await asyncio.to_thread(weights.get, key))
            result = await upload.commit()
        if swap:
            swapped = await self.swap_constant_buffer(name)
            result = ConstantUpdateResult(swapped.version, swapped.label, result.updated)
        return result, sorted(ignored)

    async def swap_constant_buffer(self, name: str) -> ConstantUpdateResult:
        """Serve the staged constants on every binding at once."""
        model = self.get(name)

        def swap() -> None:
            for package in model.bindings:
                package.check_swappable()
            for package in model.bindings:
                package.swap_constant_buffer()

        def prepare() -> None:
            for package in model.bindings:
                package.check_swappable()
                package.prepare_swap()

        started = time.monotonic()
        ok = False
        try:
            async with model.constants_lock:
                # Completing the inactive buffer does not touch running batches.
                await asyncio.to_thread(prepare)
                await model.scheduler.exclusive(swap, bump_version=True)
                model.constants_label, model.staged_label = model.staged_label, ""
                model.constants_updated_at = time.time()
            ok = True
        finally:
            self.telemetry.constants_updated(
                name, "swap_constant_buffer", ok, time.monotonic() - started, model.constants_version
            )
        return ConstantUpdateResult(model.constants_version, model.constants_label, 0)


@dataclass(frozen=True, slots=True)
class ConstantUpdateResult:
    version: int
    label: str
    updated: int


class ConstantUpload:
    """One constant operation, fed constant by constant. Use `run` for a whole dict,
    or `async with upload:` around `add` calls followed by `commit`."""

    def __init__(
        self,
        manager: ModelManager,
        model: LoadedModel,
        operation: str,
        by_fqn: bool,
        use_inactive: bool,
        full: bool,
        user_managed: bool,
        label: str,
    ) -> None:
        self._manager = manager
        self._model = model
        self._operation = operation
        self._by_fqn = by_fqn
        self._use_inactive = use_inactive
        self._full = full
        self._user_managed = user_managed
        self._label = label
        # Served updates: each binding's validated, device-resident tensors, applied at commit.
        self._collected: list[dict[str, torch.Tensor]] = [{} for _ in model.bindings]
        self._seen: set[str] = set()
        self._started = time.monotonic()
        self._locked = False
        self._done = False

    async def __aenter__(self) -> ConstantUpload:
        await self._model.constants_lock.acquire()
        self._locked = True
        return self

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            if kind is not None:
                self._fail()
        finally:
            self._model.constants_lock.release()
            self._locked = False

    async def run(self, tensors: Mapping[str, torch.Tensor]) -> ConstantUpdateResult:
        async with self:
            for key, tensor in tensors.items():
                await self.add(key, tensor)
            return await self.commit()

    async def add(self, key: str, tensor: torch.Tensor) -> None:
        """Validate one constant on every binding; stage it now, or keep it for commit."""
        assert self._locked, "use `async with upload:`"
        if key in self._seen:
            raise InvalidInput(f"constant {shown(key)} given twice")
        per_binding = self._on_each_device({key: tensor})
        for package, moved in per_binding:
            package.validate_constants(moved, by_fqn=self._by_fqn, full=False)
        self._seen.add(key)
        if not self._use_inactive:
            for collected, (_, moved) in zip(self._collected, per_binding, strict=True):
                collected.update(moved)
            return
        # The inactive buffer is not read by running batches: no pause needed.
        await asyncio.to_thread(self._apply, per_binding, True)

    async def commit(self) -> ConstantUpdateResult:
        assert self._locked, "use `async with upload:`"
        model = self._model
        if not self._seen:
            raise InvalidInput("no constants given")
        if self._full:
            table = model.bindings[0].constant_specs()
            keys = {s.fqn if self._by_fqn else s.internal_name for s in table}
            missing = sorted(keys - self._seen)
            if missing:
                raise InvalidInput(f"full update requested but constant {shown(missing[0])} is missing")
        if self._use_inactive:
            model.staged_label = self._label
        else:
            # Each constant was validated on every binding as it arrived.
            per_binding = list(zip(model.bindings, self._collected, strict=True))
            await model.scheduler.exclusive(lambda: self._apply(per_binding, False), bump_version=True)
            model.constants_label = self._label
            model.constants_updated_at = time.time()
            self._collected = [{} for _ in model.bindings]
        self._report(True)
        return ConstantUpdateResult(model.constants_version, model.constants_label, len(self._seen))

    def _fail(self) -> None:
        if self._use_inactive and self._seen:
            # A partial stage must never be swapped in.
            for package in self._model.bindings:
                package.discard_staged()
        self._report(False)

    def _report(self, ok: bool) -> None:
        if self._done:
            return
        self._done = True
        model = self._model
        self._manager.telemetry.constants_updated(
            model.config.name, self._operation, ok, time.monotonic() - self._started, model.constants_version
        )

    def _on_each_device(
        self, tensors: Mapping[str, torch.Tensor]
    ) -> list[tuple[ModelPackage, dict[str, torch.Tensor]]]:
        return [(b, {k: v.to(b.device) for k, v in tensors.items()}) for b in self._model.bindings]

    def _apply(
        self, per_binding: list[tuple[ModelPackage, dict[str, torch.Tensor]]], use_inactive: bool
    ) -> None:
        for package, moved in per_binding:
            if self._by_fqn:
                package.load_constants(
                    moved, use_inactive=use_inactive, check_full_update=False, user_managed=self._user_managed
                )
            else:
                package.update_constant_buffer(
                    moved,
                    use_inactive=use_inactive,
                    validate_full_updates=False,
                    user_managed=self._user_managed,
                )
