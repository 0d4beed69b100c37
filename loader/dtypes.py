"""The one table of element types: every name pt2serve and its protocols give a dtype.

Each protocol adapter derives its own lookups from `TYPES`; no other table of dtypes
exists. Names are torch's (`float32`), the schema's and the CLI's.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pt2serve.loader.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class ElementType:
    name: str
    torch: torch.dtype
    # numpy's type for the raw little-endian bytes (numpy has no bfloat16: int16 bits).
    numpy: type[np.generic]
    # pt2serve.v1.DType's value name, KServe v2's datatype, and the KServe typed
    # contents field that carries it (None: raw contents only).
    wire: str
    kserve: str
    kserve_contents: str | None

    @property
    def itemsize(self) -> int:
        return int(np.dtype(self.numpy).itemsize)


TYPES: tuple[ElementType, ...] = (
    ElementType("float32", torch.float32, np.float32, "FLOAT32", "FP32", "fp32_contents"),
    ElementType("float16", torch.float16, np.float16, "FLOAT16", "FP16", None),
    ElementType("bfloat16", torch.bfloat16, np.int16, "BFLOAT16", "BF16", None),
    ElementType("float64", torch.float64, np.float64, "FLOAT64", "FP64", "fp64_contents"),
    ElementType("int8", torch.int8, np.int8, "INT8", "INT8", "int_contents"),
    ElementType("int16", torch.int16, np.int16, "INT16", "INT16", "int_contents"),
    ElementType("int32", torch.int32, np.int32, "INT32", "INT32", "int_contents"),
    ElementType("int64", torch.int64, np.int64, "INT64", "INT64", "int64_contents"),
    ElementType("uint8", torch.uint8, np.uint8, "UINT8", "UINT8", "uint_contents"),
    ElementType("bool", torch.bool, np.bool_, "BOOL", "BOOL", "bool_contents"),
)
BY_NAME: dict[str, ElementType] = {t.name: t for t in TYPES}
BY_TORCH: dict[torch.dtype, ElementType] = {t.torch: t for t in TYPES}
# Name -> torch dtype, the most common lookup.
DTYPES: dict[str, torch.dtype] = {t.name: t.torch for t in TYPES}


def name_of(dtype: torch.dtype) -> str:
    """The name of a supported torch dtype; InvalidInput for any other."""
    found = BY_TORCH.get(dtype)
    if found is None:
        raise InvalidInput(f"dtype {dtype} is not supported")
    return found.name


class TensorLike(Protocol):
    """What request validation reads of an input: a torch tensor, or a RawTensor."""

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def shape(self) -> tuple[int, ...]: ...


@dataclass(slots=True)  # not frozen: made for every request, and frozen init costs µs
class RawTensor:
    """A tensor as the wire carried it: dtype, shape and little-endian, row-major bytes
    whose length the decoder checked against the shape (the client's bytes, or a view
    into the engine's received frame).

    Inputs sent as bytes and every answer stay RawTensors on the event loops: no
    torch call per request there (each takes tens of µs cold, and releases the GIL).
    A runner thread joins a batch's inputs into one tensor per input (`join_rows`) and
    cuts its outputs back into bytes (`rows_as_raw`; scheduler/batches.py).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    data: bytes | memoryview

    def tensor(self) -> torch.Tensor:
        """A torch tensor over a copy of the bytes, or over the bytes themselves when
        they are writable (a view into a frame the engine received, which nothing
        else reads): the runtime may write into its inputs."""
        data = self.data
        buffer = data if isinstance(data, memoryview) and not data.readonly else bytearray(data)
        return tensor_view(buffer, BY_TORCH[self.dtype], self.shape)

    def row_slice(self, start: int, stop: int) -> RawTensor:
        """Rows `start` to `stop` (dim 0), without a copy."""
        rows = self.shape[0]
        stop = min(stop, rows)
        row_bytes = len(self.data) // rows if rows else 0
        view = memoryview(self.data)[start * row_bytes : stop * row_bytes]
        return RawTensor(self.dtype, (stop - start, *self.shape[1:]), view)


def join_rows(parts: Sequence[RawTensor]) -> torch.Tensor:
    """One writable tensor of `parts` stacked on dim 0 (same dtype and trailing dims),
    made with one copy of their bytes."""
    first = parts[0]
    if len(parts) == 1:
        return first.tensor()
    rows = sum(p.shape[0] for p in parts)
    buffer = bytearray().join([p.data for p in parts])
    return tensor_view(buffer, BY_TORCH[first.dtype], (rows, *first.shape[1:]))


def join_raw(parts: Sequence[RawTensor]) -> RawTensor:
    """`parts` stacked on dim 0 (same dtype and trailing dims), still as bytes."""
    first = parts[0]
    if len(parts) == 1:
        return first
    rows = sum(p.shape[0] for p in parts)
    return RawTensor(first.dtype, (rows, *first.shape[1:]), b"".join([p.data for p in parts]))


def rows_as_raw(tensor: torch.Tensor, rows: Sequence[int]) -> list[AnyTensor]:
    """`tensor` cut on dim 0 into parts of `rows` rows (summing to its first dim), as
    RawTensors over one copy of its bytes: answers that event loops only copy out.

    A tensor whose bytes cannot be read here (not on the host, needing grad, or of a
    dtype the wire lacks) is cut as torch tensors, for the encoder to move or refuse.
    """
    element = BY_TORCH.get(tensor.dtype)
    if element is None or tensor.requires_grad or not tensor.is_cpu:
        return list(torch.split(tensor, list(rows))) if tensor.dim() else [tensor]
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    # One copy of the bytes, made by ctypes: on a runner thread after an idle moment,
    # numpy's view of a tensor took 32-40 µs and this 12-14 µs (measured, 2 CPUs).
    size = tensor.nbytes
    data = memoryview(ctypes.string_at(tensor.data_ptr(), size) if size else b"")
    if not tensor.dim():  # a lone request's scalar output
        return [RawTensor(tensor.dtype, (), data)]
    tail = tuple(tensor.shape[1:])
    row_bytes = len(data) // tensor.shape[0] if tensor.shape[0] else 0
    parts: list[AnyTensor] = []
    start = 0
    for count in rows:
        stop = start + count * row_bytes
        parts.append(RawTensor(tensor.dtype, (count, *tail), data[start:stop]))
        start = stop
    return parts


def as_raw(tensor: torch.Tensor) -> AnyTensor:
    """The whole of `tensor` as `rows_as_raw` gives it: a RawTensor where it can."""
    return rows_as_raw(tensor, [tensor.shape[0]] if tensor.dim() else [])[0]


def tensor_view(
    buffer: bytearray | memoryview, element: ElementType, shape: Sequence[int], offset: int = 0
) -> torch.Tensor:
    """A tensor over the little-endian, row-major bytes of `buffer` from `offset`,
    without a copy (it keeps `buffer` alive); bfloat16 from its int16 bits."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(tuple(shape), dtype=element.torch)
    array = np.frombuffer(buffer, dtype=element.numpy, count=count, offset=offset).reshape(shape)
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if element.torch == torch.bfloat16 else tensor


# A tensor as decoders produce it and answers carry it: a torch tensor, or (bytes not
# yet made one, on a front end's path to and from the engine) a RawTensor.
AnyTensor = torch.Tensor | RawTensor
