"""Weight files: `.safetensors`, or a `torch.save` state dict read with weights_only=True.

Tensors are read one at a time (safetensors lazily, state dicts memory-mapped), so
loading a large file never holds a second full copy of it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pt2serve.loader.errors import InvalidInput, PackageNotFound, shown


class WeightFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._safetensors: Any = None
        self._state: dict[str, Any] | None = None

    def keys(self) -> list[str]:
        if self._safetensors is not None:
            return list(self._safetensors.keys())
        assert self._state is not None
        return list(self._state)

    def get(self, key: str) -> torch.Tensor:
        if self._safetensors is not None:
            tensor: torch.Tensor = self._safetensors.get_tensor(key)
            return tensor.contiguous()
        assert self._state is not None
        value = self._state[key]
        if not isinstance(value, torch.Tensor):
            raise InvalidInput(f"{self.path!r}: entry {key!r} is not a tensor")
        return value.contiguous()


@contextmanager
def open_weights(path: str) -> Iterator[WeightFile]:
    """Open a weight file; the kind is told by its contents, not its name."""
    if not os.path.isfile(path):
        raise PackageNotFound(f"no weight file at {shown(path)}")
    weights = WeightFile(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK"):  # torch.save's zip container
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise InvalidInput(f"{shown(path)} is not a weights-only torch.save file: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise InvalidInput(f"{shown(path)} does not hold a state dict (a dict of name -> tensor)")
        weights._state = state
        yield weights
        return
    from safetensors import safe_open

    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as exc:
        raise InvalidInput(
            f"{shown(path)} is neither a safetensors file nor a torch.save state dict: {exc}"
        ) from exc
    with handle as opened:
        weights._safetensors = opened
        yield weights
