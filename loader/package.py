"""`ModelPackage`: one loaded AOTInductor package, bound to one device.

It wraps `torch._C._aoti.AOTIModelPackageLoader` method for method and adds what
the runtime leaves out: a serving schema checked before every run, and dtype /
shape / device / layout checks before every constant update (the runtime checks
none and corrupts memory on a mismatch).

Thread-safety: `run` may be called from several threads at once (the loader hands
each call to one of its `num_runners` containers). Constant updates must not
overlap runs; the scheduler serialises them (see `scheduler.ModelScheduler.exclusive`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pt2serve.loader.errors import InvalidInput, PackageError, PackageNotFound, Unsupported, shown
from pt2serve.loader.native import NativeContainer
from pt2serve.loader.schema import (
    DTYPE_NAMES,
    METADATA_KEY,
    ConstantSpec,
    ModelSchema,
    constants_from_wrapper,
    derive_from_wrapper,
)

DEFAULT_MODEL_NAME = "model"


@dataclass(frozen=True, slots=True)
class CallSpec:
    in_spec: str
    out_spec: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


RUNTIMES = ("native", "binding")


@dataclass(frozen=True, slots=True)
class LoadOptions:
    model_name: str = DEFAULT_MODEL_NAME
    run_single_threaded: bool = False
    num_runners: int = 1
    device_index: int = -1
    # "native": the model's C ABI through ctypes, GIL released while it runs.
    # "binding": torch's AOTIModelPackageLoader, the reference implementation.
    runtime: str = "native"


def load_metadata_from_package(path: str, model_name: str = DEFAULT_MODEL_NAME) -> dict[str, str]:
    """The package's metadata, read without loading the model."""
    _check_package_file(path)
    loader_cls: Any = torch._C._aoti.AOTIModelPackageLoader
    try:
        return dict(loader_cls.load_metadata_from_package(path, model_name))
    except RuntimeError as exc:
        raise PackageError(
            f"cannot read metadata of {shown(path)} (model {shown(model_name)}): {exc}"
        ) from exc


def read_package_sources(path: str, model_name: str = DEFAULT_MODEL_NAME) -> str | None:
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
        runtime: Any,
        schema: ModelSchema,
        metadata: dict[str, str],
        constants: dict[str, ConstantSpec] | None,
    ) -> None:
        self.path = path
        self.options = options
        self.schema = schema
        # Exactly one of the two runtimes serves this package.
        self._native: NativeContainer | None = runtime if isinstance(runtime, NativeContainer) else None
        self._loader: Any = None if self._native is not None else runtime
        self._metadata = metadata
        self._constants = constants
        self._user_managed: dict[str, torch.Tensor] = {}
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
        if options.runtime not in RUNTIMES:
            raise InvalidInput(f"runtime must be one of {', '.join(RUNTIMES)}, got {options.runtime!r}")
        metadata = load_metadata_from_package(path, options.model_name)
        resolved = resolve_schema(path, options.model_name, metadata, schema)
        source = read_package_sources(path, options.model_name)
        constants = constants_from_wrapper(source) if source is not None else None
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
            return cls(path, options, container, resolved, metadata, constants)
        try:
            loader = torch._C._aoti.AOTIModelPackageLoader(
                path,
                options.model_name,
                options.run_single_threaded,
                options.num_runners,
                options.device_index,
            )
        except RuntimeError as exc:
            raise PackageError(
                f"cannot load {shown(path)} (model {shown(options.model_name)}): {exc}"
            ) from exc
        return cls(path, options, loader, resolved, dict(loader.get_metadata()), constants)

    def close(self) -> None:
        """Free the model container (the .so stays mapped: the runtime never unloads it)."""
        if self._native is not None:
            self._native.close()
        self._loader = None

    # ---------------------------------------------------------------- running
    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run validated inputs (call order); the runtime may reuse their storage."""
        if self._native is not None:
            return self._native.run(inputs)
        outputs: list[torch.Tensor] = self._loader.boxed_run(list(inputs))
        return outputs

    # ------------------------------------------------------------ inspection
    def get_metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def get_call_spec(self) -> CallSpec:
        if self._native is not None:
            in_spec, out_spec = self._native.call_spec()
        else:
            in_spec, out_spec = self._loader.get_call_spec()
        return CallSpec(in_spec, out_spec, self.schema.input_names, self.schema.output_names)

    def get_constant_fqns(self) -> list[str]:
        if self._native is not None:
            return [s.fqn for s in self._require_constant_table().values() if not s.from_folded]
        return list(self._loader.get_constant_fqns())

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
        if self._native is not None:
            table = self._require_constant_table()
            by_name = {table[fqn].internal_name: t for fqn, t in constants.items()}
            self._native_update(by_name, use_inactive, check_full_update)
            return
        self._keep_user_managed(constants, user_managed)
        self._loader.load_constants(dict(constants), use_inactive, check_full_update, user_managed)

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
        if self._native is not None:
            self._native_update(tensors, use_inactive, validate_full_updates)
            return
        self._keep_user_managed(tensors, user_managed)
        self._loader.update_constant_buffer(dict(tensors), use_inactive, validate_full_updates, user_managed)

    def _native_update(self, by_name: Mapping[str, torch.Tensor], use_inactive: bool, full: bool) -> None:
        # The native runtime always copies: user_managed (which makes the runtime
        # borrow the caller's storage, and leaks with the binding) changes nothing.
        assert self._native is not None
        self._native.update_constants(by_name, use_inactive=use_inactive, validate_full=full)
        if use_inactive:
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
        assert self._native is not None
        self._native.update_constants(self._refilled, use_inactive=True, validate_full=False)
        self._refilled_current = True

    def swap_constant_buffer(self) -> None:
        """Serve the inactive buffer. Refused unless every constant was staged since
        the last swap: the runtime leaves unstaged parameters empty and then crashes."""
        self.check_swappable()
        self.prepare_swap()
        assert self._native is not None
        self._native.swap_constant_buffer()
        self.discard_staged()

    def discard_staged(self) -> None:
        """Forget what was staged: a swap then needs every constant staged again."""
        self._staged.clear()
        self._refilled.clear()
        self._refilled_current = True

    def check_swappable(self) -> None:
        if self._native is None:
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
            got = DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype))
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

    def _keep_user_managed(self, tensors: Mapping[str, torch.Tensor], user_managed: bool) -> None:
        # With user_managed the runtime points at our tensors' storage instead of
        # copying it, so they must live as long as the buffer that uses them.
        if user_managed:
            self._user_managed.update(tensors)

    def _require_constant_table(self) -> dict[str, ConstantSpec]:
        if self._constants is None:
            raise Unsupported(
                f"{self.path!r} has no wrapper source, so constant dtypes and shapes are "
                "unknown; constant updates are refused rather than risk corrupting memory"
            )
        return self._constants

    @property
    def device(self) -> torch.device:
        key = self._metadata.get("AOTI_DEVICE_KEY", "cpu")
        if key == "cpu":
            return torch.device("cpu")
        index = self.options.device_index if self.options.device_index >= 0 else 0
        return torch.device(key, index)


def _device_string(metadata: Mapping[str, str], device_index: int) -> str:
    key = metadata.get("AOTI_DEVICE_KEY", "cpu")
    if key == "cpu" or device_index < 0:
        return key
    return f"{key}:{device_index}"


def _check_package_file(path: str) -> None:
    if not os.path.isfile(path):
        raise PackageNotFound(f"no package file at {shown(path)}")
