"""`ModelPackage`: one loaded AOTInductor package, bound to one device.

It wraps `torch._C._aoti.AOTIModelPackageLoader` method for method and adds what
the runtime leaves out: a serving schema checked before every run, and dtype /
shape / device / layout checks before every constant update (the runtime checks
none and corrupts memory on a mismatch).

Thread-safety: `run` may be called from several threads at once (the runtime hands
each call to one of its `num_runners` model instances). Constant updates must not
overlap runs; the scheduler serialises them (`ModelScheduler.exclusive`). Staging
(`use_inactive`) may overlap runs: it writes only the inactive buffer.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pt2serve.loader import defaults
from pt2serve.loader.dtypes import BY_TORCH
from pt2serve.loader.errors import InvalidInput, PackageError, PackageNotFound, Unsupported, shown
from pt2serve.loader.native import NativeContainer
from pt2serve.loader.runtime import BindingRuntime, NativeRuntime, Runtime, no_constant_table
from pt2serve.loader.schema import (
    METADATA_KEY,
    ConstantSpec,
    ModelSchema,
    constants_from_wrapper,
    derive_from_wrapper,
)


@dataclass(frozen=True, slots=True)
class CallSpec:
    in_spec: str
    out_spec: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LoadOptions:
    model_name: str = defaults.MODEL_NAME
    run_single_threaded: bool = False
    num_runners: int = defaults.NUM_RUNNERS
    device_index: int = defaults.DEVICE_INDICES[0]
    # "native": the model's C ABI through ctypes, GIL released while it runs.
    # "binding": torch's AOTIModelPackageLoader, the reference implementation.
    runtime: str = defaults.RUNTIME


def load_metadata_from_package(path: str, model_name: str = defaults.MODEL_NAME) -> dict[str, str]:
    """The package's metadata, read without loading the model."""
    _check_package_file(path)
    loader_cls: Any = torch._C._aoti.AOTIModelPackageLoader
    try:
        return dict(loader_cls.load_metadata_from_package(path, model_name))
    except RuntimeError as exc:
        raise PackageError(
            f"cannot read metadata of {shown(path)} (model {shown(model_name)}): {exc}"
        ) from exc


def read_package_sources(path: str, model_name: str = defaults.MODEL_NAME) -> str | None:
    """The compiled wrapper .cpp of `model_name` in the package, or None if absent."""
    _check_package_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            marker = f"data/aotinductor/{model_name}/"
            names = [n for n in archive.namelist() if marker in n and n.endswith(".wrapper.cpp")]
            if not names:
                return None
            return archive.read(names[0]).decode("utf-8", errors="replace")
    except zipfile.BadZipFile as exc:
        raise PackageError(f"{shown(path)} is not a .pt2 package: {exc}") from exc


def resolve_schema(
    path: str, model_name: str, metadata: Mapping[str, str], override: ModelSchema | None
) -> ModelSchema:
    """The schema to serve with: the user's, the package's own, or derived."""
    if override is not None:
        return override
    stored = metadata.get(METADATA_KEY)
    if stored:
        return ModelSchema.from_json(stored, source="package")
    source = read_package_sources(path, model_name)
    if source is None:
        raise PackageError(
            f"{shown(path)} carries no serving schema and no wrapper source to derive one "
            "from; give a schema when loading it"
        )
    return derive_from_wrapper(source)


class ModelPackage:
    """A package loaded on one device, with its schema and constant table."""

    def __init__(
        self,
        path: str,
        options: LoadOptions,
        runtime: Runtime,
        schema: ModelSchema,
        metadata: dict[str, str],
        constants: dict[str, ConstantSpec] | None,
    ) -> None:
        self.path = path
        self.options = options
        self.schema = schema
        self._runtime = runtime
        self._metadata = metadata
        self._constants = constants
        self.device = _device(metadata, options.device_index)
        # Internal names staged into the inactive buffer since the last swap.
        self._staged: set[str] = set()
        # Staged constants that a later staging call would overwrite with the active
        # buffer's value (see ConstantSpec.refilled_when_staging), kept to be staged
        # again, all in one call, right before the swap.
        self._refilled: dict[str, torch.Tensor] = {}
        self._refilled_current = True
        self._refilled_names = frozenset(
            s.internal_name for s in (constants or {}).values() if s.refilled_when_staging
        )

    @classmethod
    def load(
        cls, path: str, options: LoadOptions = LoadOptions(), schema: ModelSchema | None = None
    ) -> ModelPackage:
        if options.num_runners < 1:
            raise InvalidInput(f"num_runners must be at least 1, got {options.num_runners}")
        if options.runtime not in defaults.RUNTIMES:
            raise InvalidInput(
                f"runtime must be one of {', '.join(defaults.RUNTIMES)}, got {options.runtime!r}"
            )
        metadata = load_metadata_from_package(path, options.model_name)
        resolved = resolve_schema(path, options.model_name, metadata, schema)
        source = read_package_sources(path, options.model_name)
        constants = constants_from_wrapper(source) if source is not None else None
        runtime: Runtime
        if options.runtime == "native":
            container = NativeContainer(
                path,
                options.model_name,
                num_runners=1 if options.run_single_threaded else options.num_runners,
                device=_device_string(metadata, options.device_index),
                single_threaded=options.run_single_threaded,
            )
            if container.num_inputs != len(resolved.inputs):
                container.close()
                raise PackageError(
                    f"{path!r}: the model takes {container.num_inputs} inputs, "
                    f"the schema names {len(resolved.inputs)}"
                )
            runtime = NativeRuntime(container, constants, path)
        else:
            binding = BindingRuntime.load(
                path,
                options.model_name,
                options.run_single_threaded,
                options.num_runners,
                options.device_index,
            )
            runtime, metadata = binding, binding.metadata()
        return cls(path, options, runtime, resolved, metadata, constants)

    def close(self) -> None:
        """Free the model container (the .so stays mapped: the runtime never unloads it)."""
        self._runtime.close()

    # ---------------------------------------------------------------- running
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run validated inputs (call order) on the package's device; the runtime
        may reuse their storage."""
        return self._runtime.run(inputs)

    def host_runner(self) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
        """`run_on_host`, with as few calls in between as the device allows: on the
        CPU, the runtime's own `run` (it runs for every batch)."""
        return self._runtime.run if self.device.type == "cpu" else self.run_on_host

    def run_on_host(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`run` for host tensors: inputs move to the device, outputs come back."""
        if self.device.type == "cpu":
            return self._runtime.run(inputs)
        moved = [t.to(self.device, non_blocking=True) for t in inputs]
        return [t.cpu() for t in self._runtime.run(moved)]

    def on_device(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`tensors` on this binding's device (constants to validate and load)."""
        return {k: v.to(self.device) for k, v in tensors.items()}

    # ------------------------------------------------------------ inspection
    def get_metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_call_spec(self) -> CallSpec:
        in_spec, out_spec = self._runtime.call_spec()
        return CallSpec(in_spec, out_spec, self.schema.input_names, self.schema.output_names)

    def get_constant_fqns(self) -> list[str]:
        return self._runtime.constant_fqns()

    def constant_specs(self) -> list[ConstantSpec]:
        """Each updatable constant with dtype and shape, in get_constant_fqns order."""
        table = self._require_constant_table()
        return [table[fqn] for fqn in self.get_constant_fqns() if fqn in table]

    # --------------------------------------------------------------- updates
    def load_constants(
        self,
        constants: Mapping[str, torch.Tensor],
        *,
        use_inactive: bool,
        check_full_update: bool,
        user_managed: bool = False,
    ) -> None:
        """`AOTIModelPackageLoader.load_constants`: keys are FQNs. Validated first."""
        self.validate_constants(constants, by_fqn=True, full=check_full_update)
        self._runtime.load_constants(
            constants, use_inactive=use_inactive, full=check_full_update, user_managed=user_managed
        )
        if use_inactive:
            table = self._require_constant_table()
            self._note_staged({table[fqn].internal_name: t for fqn, t in constants.items()})

    def update_constant_buffer(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        use_inactive: bool,
        validate_full_updates: bool,
        user_managed: bool = False,
    ) -> None:
        """`AOTIModelPackageLoader.update_constant_buffer`: keys are internal names."""
        self.validate_constants(tensors, by_fqn=False, full=validate_full_updates)
        self._runtime.update_constant_buffer(
            tensors, use_inactive=use_inactive, full=validate_full_updates, user_managed=user_managed
        )
        if use_inactive:
            self._note_staged(tensors)

    def _note_staged(self, by_name: Mapping[str, torch.Tensor]) -> None:
        self._staged.update(by_name)
        self._refilled.update((n, t) for n, t in by_name.items() if n in self._refilled_names)
        # This call copied the active value of every refilled constant it left out.
        self._refilled_current = not (self._refilled.keys() - by_name.keys())

    def prepare_swap(self) -> None:
        """Stage the kept buffers again, in one call, so the inactive buffer holds
        everything staged since the last swap. Needed before every swap: staging one
        constant per call (streams, files) would otherwise serve new parameters with
        the old BatchNorm statistics. Cheap when nothing was reverted."""
        if self._refilled_current or not self._refilled:
            return
        self._runtime.update_constant_buffer(
            self._refilled, use_inactive=True, full=False, user_managed=False
        )
        self._refilled_current = True

    def swap_constant_buffer(self) -> None:
        """Serve the inactive buffer. Refused unless every constant was staged since
        the last swap: the runtime leaves unstaged parameters empty and then crashes."""
        self.check_swappable()
        self.prepare_swap()
        self._runtime.swap_constant_buffer()
        self.discard_staged()

    def discard_staged(self) -> None:
        """Forget what was staged: a swap then needs every constant staged again."""
        self._staged.clear()
        self._refilled.clear()
        self._refilled_current = True

    def check_swappable(self) -> None:
        if not self._runtime.can_swap:
            raise Unsupported("torch's loader binding has no swap; load the model with the native runtime")
        table = self._require_constant_table()
        missing = sorted(
            s.fqn for s in table.values() if not s.from_folded and s.internal_name not in self._staged
        )
        if missing:
            raise Unsupported(
                f"cannot swap: constant {shown(missing[0])} and {len(missing) - 1} more were not staged "
                "in the inactive buffer since the last swap"
            )

    def validate_constants(self, tensors: Mapping[str, torch.Tensor], *, by_fqn: bool, full: bool) -> None:
        """Raise InvalidInput unless every tensor matches its constant exactly.

        The runtime copies raw bytes without checking: a wrong dtype or shape
        corrupts the heap, so nothing reaches it unchecked.
        """
        specs = {(s.fqn if by_fqn else s.internal_name): s for s in self.constant_specs()}
        what = "constant" if by_fqn else "constant (internal name)"
        if not tensors:
            raise InvalidInput("no constants given")
        for key, tensor in tensors.items():
            spec = specs.get(key)
            if spec is None:
                known = ", ".join(sorted(specs)) or "none"
                raise InvalidInput(f"unknown {what} {shown(key)}; known: {known}")
            found = BY_TORCH.get(tensor.dtype)
            got = found.name if found is not None else str(tensor.dtype)
            if got != spec.dtype:
                raise InvalidInput(f"{what} {shown(key)}: dtype {got}, expected {spec.dtype}")
            if tuple(tensor.shape) != spec.shape:
                raise InvalidInput(
                    f"{what} {shown(key)}: shape {list(tensor.shape)}, expected {list(spec.shape)}"
                )
            if not tensor.is_contiguous():
                raise InvalidInput(f"{what} {shown(key)}: tensor is not contiguous")
            if tensor.device != self.device:
                raise InvalidInput(f"{what} {shown(key)}: on {tensor.device}, expected {self.device}")
        if full:
            missing = sorted(set(specs) - set(tensors))
            if missing:
                raise InvalidInput(f"full update requested but {what} {shown(missing[0])} is missing")

    def _require_constant_table(self) -> dict[str, ConstantSpec]:
        if self._constants is None:
            raise no_constant_table(self.path)
        return self._constants


def _device(metadata: Mapping[str, str], device_index: int) -> torch.device:
    key = metadata.get("AOTI_DEVICE_KEY", "cpu")
    if key == "cpu":
        return torch.device("cpu")
    return torch.device(key, device_index if device_index >= 0 else 0)


def _device_string(metadata: Mapping[str, str], device_index: int) -> str:
    key = metadata.get("AOTI_DEVICE_KEY", "cpu")
    if key == "cpu" or device_index < 0:
        return key
    return f"{key}:{device_index}"


def _check_package_file(path: str) -> None:
    if not os.path.isfile(path):
        raise PackageNotFound(f"no package file at {shown(path)}")
