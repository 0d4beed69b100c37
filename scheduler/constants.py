"""`ConstantOps`: a served model's constants (weights and buffers), updated on every
binding together: staged into the inactive buffer and swapped in between batches,
or applied between batches at once. Every operation is all-or-nothing across the
bindings, one at a time per model, and reported to telemetry once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pt2serve.loader.errors import InvalidInput, shown
from pt2serve.loader.package import ModelPackage
from pt2serve.loader.weights import open_weights
from pt2serve.scheduler.registry import LoadedModel, ModelRegistry


class ConstantOps:
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def begin_upload(
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
            self._registry,
            self._registry.get(name),
            operation,
            by_fqn,
            use_inactive,
            full,
            user_managed,
            label,
        )

    async def apply(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        *,
        by_fqn: bool,
        use_inactive: bool,
        full: bool,
        user_managed: bool = False,
        label: str = "",
    ) -> ConstantUpdateResult:
        """`load_constants` (keys are FQNs) or `update_constant_buffer` (keys are
        internal names) on every binding."""
        upload = self.begin_upload(
            name, by_fqn=by_fqn, use_inactive=use_inactive, full=full, user_managed=user_managed, label=label
        )
        return await upload.run(tensors)

    async def load_from_file(
        self, name: str, path: str, *, use_inactive: bool, full: bool, swap: bool, label: str = ""
    ) -> tuple[ConstantUpdateResult, list[str]]:
        """load_constants from a weight file, one tensor at a time. Entries that are
        not constants of the model (folded or absent) are skipped and listed."""
        model = self._registry.get(name)
        constants = {s.fqn for s in model.bindings[0].constant_specs()}
        upload = self.begin_upload(name, by_fqn=True, use_inactive=use_inactive, full=full, label=label)
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
            swapped = await self.swap(name)
            result = ConstantUpdateResult(swapped.version, swapped.label, result.updated)
        return result, sorted(ignored)

    async def discard(self, name: str) -> ConstantUpdateResult:
        """Forget what was staged on every binding (a later swap needs every constant
        staged again); the served constants do not change."""
        model = self._registry.get(name)
        async with model.constants_lock:
            for package in model.bindings:
                package.discard_staged()
            model.staged_label = ""
        return ConstantUpdateResult(model.constants_version, model.constants_label, 0)

    async def swap(self, name: str) -> ConstantUpdateResult:
        """Serve the staged constants on every binding at once."""
        model = self._registry.get(name)

        def prepare() -> None:
            for package in model.bindings:
                package.check_swappable()
                package.prepare_swap()

        def swap() -> None:
            # `prepare` checked every binding under the same lock, so nothing staged
            # has changed since: all of them can swap (while batches are paused).
            for package in model.bindings:
                package.swap_constant_buffer()

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
            self._registry.telemetry.constants_updated(
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
        registry: ModelRegistry,
        model: LoadedModel,
        operation: str,
        by_fqn: bool,
        use_inactive: bool,
        full: bool,
        user_managed: bool,
        label: str,
    ) -> None:
        self._registry = registry
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
        per_binding = [(b, b.on_device({key: tensor})) for b in self._model.bindings]
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
            # Each constant was validated on every binding as it arrived (add), and
            # ModelPackage checks it again: nothing reaches the runtime unchecked.
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
        self._registry.telemetry.constants_updated(
            model.config.name, self._operation, ok, time.monotonic() - self._started, model.constants_version
        )

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
