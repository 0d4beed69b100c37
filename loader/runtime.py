"""`Runtime`: what drives one loaded model container. Two implementations:

- `NativeRuntime`: the model .so's C ABI through ctypes (loader/native.py); the GIL
  is released while the model runs, and it can swap constant buffers.
- `BindingRuntime`: torch's `AOTIModelPackageLoader` binding, the reference
  implementation (it holds the GIL for a whole run and has no swap).

Both take constants already validated by `ModelPackage`: the runtimes check neither
dtype nor shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from pt2serve.loader.errors import PackageError, Unsupported, shown
from pt2serve.loader.native import NativeContainer
from pt2serve.loader.schema import ConstantSpec


def no_constant_table(path: str) -> Unsupported:
    return Unsupported(
        f"{path!r} has no wrapper source, so constant dtypes and shapes are "
        "unknown; constant updates are refused rather than risk corrupting memory"
    )


class Runtime(Protocol):
    can_swap: bool

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...

    def call_spec(self) -> tuple[str, str]: ...

    def constant_fqns(self) -> list[str]: ...

    def load_constants(
        self, by_fqn: Mapping[str, torch.Tensor], *, use_inactive: bool, full: bool, user_managed: bool
    ) -> None: ...

    def update_constant_buffer(
        self, by_name: Mapping[str, torch.Tensor], *, use_inactive: bool, full: bool, user_managed: bool
    ) -> None: ...

    def swap_constant_buffer(self) -> None: ...

    def close(self) -> None: ...


class NativeRuntime:
    can_swap = True

    def __init__(
        self, container: NativeContainer, constants: Mapping[str, ConstantSpec] | None, path: str
    ) -> None:
        self._container = container
        self._constants = constants
        self._path = path
        # The container's own method: no call in between, for every batch.
        self.run: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] = container.run

    def call_spec(self) -> tuple[str, str]:
        return self._container.call_spec()

    def constant_fqns(self) -> list[str]:
        # The C ABI lists no FQNs: they come from the wrapper source's table.
        return [s.fqn for s in self._table().values() if not s.from_folded]

    def load_constants(
        self, by_fqn: Mapping[str, torch.Tensor], *, use_inactive: bool, full: bool, user_managed: bool
    ) -> None:
        table = self._table()
        by_name = {table[fqn].internal_name: t for fqn, t in by_fqn.items()}
        self.update_constant_buffer(by_name, use_inactive=use_inactive, full=full, user_managed=user_managed)

    def update_constant_buffer(
        self, by_name: Mapping[str, torch.Tensor], *, use_inactive: bool, full: bool, user_managed: bool
    ) -> None:
        # The C ABI always copies: user_managed (the runtime borrowing the caller's
        # storage, which leaks with the binding) changes nothing here.
        self._container.update_constants(by_name, use_inactive=use_inactive, validate_full=full)

    def swap_constant_buffer(self) -> None:
        self._container.swap_constant_buffer()

    def _table(self) -> Mapping[str, ConstantSpec]:
        if self._constants is None:
            raise no_constant_table(self._path)
        return self._constants

    def close(self) -> None:
        self._container.close()


class BindingRuntime:
    can_swap = False

    def __init__(self, loader: Any) -> None:
        self._loader: Any = loader
        # With user_managed the runtime points at these tensors' storage instead of
        # copying it: they must live as long as the buffer that uses them.
        self._user_managed: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def load(
        cls, path: str, model_name: str, single_threaded: bool, num_runners: int, device: int
    ) -> BindingRuntime:
        try:
            loader = torch._C._aoti.AOTIModelPackageLoader(
                path, model_name, single_threaded, num_runners, device
            )
        except RuntimeError as exc:
            raise PackageError(f"cannot load {shown(path)} (model {shown(model_name)}): {exc}") from exc
        return cls(loader)

    def metadata(self) -> dict[str, str]:
        return dict(self._loader.get_metadata())

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = self._loader.boxed_run(list(inputs))
        return outputs

    def call_spec(self) -> tuple[str, str]:
        in_spec, out_spec = self._loader.get_call_spec()
        return str(in_spec), str(out_spec)

    def constant_fqns(self) -> list[str]:
        return list(self._loader.get_constant_fqns())

    def load_constants(
        self, by_fqn: Mapping[str, torch.Tensor], *, use_inactive: bool, full: bool, user_managed: bool
    ) -> None:
        if user_managed:
            self._user_managed.update((("fqn", k), v) for k, v in by_fqn.items())
        self._loader.load_constants(dict(by_fqn), use_inactive, full, user_managed)

    def update_constant_buffer(
        self, by_name: Mapping[str, torch.Tensor], *, use_inactive: bool, full: bool, user_managed: bool
    ) -> None:
        if user_managed:
            self._user_managed.update((("name", k), v) for k, v in by_name.items())
        self._loader.update_constant_buffer(dict(by_name), use_inactive, full, user_managed)

    def swap_constant_buffer(self) -> None:
        raise Unsupported("torch's loader binding has no swap; load the model with the native runtime")

    def close(self) -> None:
        self._loader = None
