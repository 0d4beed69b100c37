"""Tensors on the pt2serve.v1 wire: `Tensor` messages and chunked constants.

Wire bytes are little-endian and row-major. Inference inputs are checked against
their declared dtype and shape and kept as bytes (`RawTensor`): a front end sends
them to the engine, and answers back to the client, without a torch call. The data
plane that runs the model makes them tensors, with numpy, not torch ops: every
torch op releases and re-takes the GIL, and with a runner thread waiting for it
that is a thread switch per request on the event loop.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from pt2serve.loader.dtypes import BY_NAME, BY_TORCH, TYPES, AnyTensor, RawTensor
from pt2serve.loader.errors import InvalidInput, shown
from pt2serve.service.pb import pt2serve_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - the wire format is little-endian
    raise ImportError("pt2serve supports little-endian hosts only")

_TO_PB: dict[str, pb.DType] = {t.name: pb.DType.Value(t.wire) for t in TYPES}  # type: ignore[misc]
_FROM_PB: dict[pb.DType, str] = {v: k for k, v in _TO_PB.items()}
# gRPC message size, both ways, for servers and clients alike.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


# Above this many bytes a declared shape is refused even when it has no elements:
# torch cannot lay out such a tensor, and no real input is that large.
MAX_DECLARED_BYTES = 1 << 40


def check_shape(field: str, shape: list[int], itemsize: int, max_bytes: int | None) -> int:
    """Validate a client-declared shape before anything is allocated; returns numel.
    Runs for every input of every request: the common case (all dims positive) is
    one product and one comparison."""
    numel = math.prod(shape)
    span = numel * itemsize
    if shape and min(shape) <= 0:
        if min(shape) < 0:
            raise InvalidInput(f"{field}: negative dimension in shape {shape}")
        # Empty, but a huge declared span is still refused: no tensor could have it.
        span = math.prod(max(d, 1) for d in shape) * itemsize
    limit = MAX_DECLARED_BYTES if max_bytes is None else min(max_bytes, MAX_DECLARED_BYTES)
    if span > limit:
        raise InvalidInput(f"{field}: shape {shape} spans {span} bytes, over the server's limit of {limit}")
    return numel


def itemsize(dtype_name: str) -> int:
    return BY_NAME[dtype_name].itemsize


def dtype_to_pb(name: str | None) -> pb.DType:
    return _TO_PB[name] if name is not None else pb.DTYPE_UNSPECIFIED


def dtype_from_pb(value: pb.DType) -> str | None:
    """The dtype name of a wire enum value; None for an unsupported one."""
    return _FROM_PB.get(value)


def raw_tensor_from_pb(msg: pb.Tensor, field: str, max_bytes: int | None = None) -> RawTensor:
    """Check a wire tensor; `field` names it in errors (e.g. "inputs['x']")."""
    name = _FROM_PB.get(msg.dtype)
    if name is None:
        label = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
        raise InvalidInput(f"{field}: dtype {label} is not supported")
    # Each read of a bytes field is a copy: read it once.
    return raw_tensor(field, msg.data, name, list(msg.shape), max_bytes)


def tensor_from_pb(msg: pb.Tensor, field: str, max_bytes: int | None = None) -> torch.Tensor:
    """Decode a wire tensor into a torch tensor owning its memory."""
    return raw_tensor_from_pb(msg, field, max_bytes).tensor()


def raw_tensor(
    field: str,
    data: bytes,
    dtype_name: str,
    shape: list[int],
    max_bytes: int | None,
    *,
    data_has: str = "data has",
    type_label: str | None = None,
) -> RawTensor:
    """Check a client's shape and bytes against each other and the server's limit.
    `data_has` and `type_label` name the protocol's own fields in errors."""
    element = BY_NAME[dtype_name]
    size = element.itemsize
    expected = check_shape(field, shape, size, max_bytes) * size
    if len(data) != expected:
        raise InvalidInput(
            f"{field}: {data_has} {len(data)} bytes, shape {shape} of {type_label or dtype_name} "
            f"needs {expected}"
        )
    return RawTensor(element.torch, tuple(shape), data)


def tensor_bytes(tensor: AnyTensor) -> bytes:
    """`tensor` as little-endian, row-major bytes, whatever its strides or device."""
    if isinstance(tensor, RawTensor):
        return bytes(tensor.data)  # no copy of bytes, only of a view
    if tensor.requires_grad or not tensor.is_cpu:  # no torch op otherwise (see module doc)
        tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bits
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def tensor_to_pb(tensor: AnyTensor) -> pb.Tensor:
    msg = pb.Tensor()
    fill_tensor_pb(msg, tensor)
    return msg


def fill_tensor_pb(msg: pb.Tensor, tensor: AnyTensor) -> None:
    """Write `tensor` into an empty `msg` in place (no message copy)."""
    element = BY_TORCH.get(tensor.dtype)
    if element is None:
        raise InvalidInput(f"dtype {tensor.dtype} cannot be sent")
    msg.dtype = _TO_PB[element.name]
    msg.shape.extend(tensor.shape)
    msg.data = tensor_bytes(tensor)


def tensors_from_pb(
    msgs: Mapping[str, pb.Tensor], field: str, max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    return {name: tensor_from_pb(t, f"{field}[{shown(name)}]", max_bytes) for name, t in msgs.items()}


def raw_tensors_from_pb(
    msgs: Mapping[str, pb.Tensor], field: str, max_bytes: int | None = None
) -> dict[str, RawTensor]:
    """Checked, not yet torch tensors: a request's inputs on their way to the data plane."""
    decoded = {}
    for name, msg in msgs.items():
        try:
            decoded[name] = raw_tensor_from_pb(msg, field, max_bytes)
        except InvalidInput:
            # Checked again to name the tensor: its label is made only for an error
            # (this runs for every request).
            raw_tensor_from_pb(msg, f"{field}[{shown(name)}]", max_bytes)
            raise
    return decoded


class ChunkAssembler:
    """Builds constants from `TensorChunk`s that arrive in order, one constant at a time
    or interleaved; returns each constant once its last byte has arrived."""

    def __init__(self, expected_bytes: Callable[[str], int | None] | None = None) -> None:
        # The size each constant must have; a chunk declaring another size (or an
        # unknown constant) is refused before anything is allocated.
        self._expected = expected_bytes
        self._open: dict[str, tuple[pb.Tensor, torch.Tensor, np.ndarray[Any, Any], int]] = {}

    def add(self, chunk: pb.TensorChunk) -> tuple[str, torch.Tensor] | None:
        field = f"chunks[{shown(chunk.fqn)}]"
        if not chunk.fqn:
            raise InvalidInput("chunks: fqn is required")
        state = self._open.get(chunk.fqn)
        if state is None:
            header = pb.Tensor(dtype=chunk.dtype, shape=chunk.shape)
            name = _FROM_PB.get(chunk.dtype)
            if name is None:
                raise InvalidInput(f"{field}: dtype {chunk.dtype} is not supported")
            size = BY_NAME[name].itemsize
            declared = check_shape(field, list(header.shape), size, None) * size
            if self._expected is not None:
                expected = self._expected(chunk.fqn)
                if expected is None:
                    raise InvalidInput(f"{field}: unknown constant")
                if declared != expected:
                    raise InvalidInput(
                        f"{field}: dtype and shape declare {declared} bytes, the constant has {expected}"
                    )
            tensor = torch.empty(list(chunk.shape), dtype=BY_NAME[name].torch)
            raw = tensor.reshape(-1).view(torch.uint8).numpy()
            state = (header, tensor, raw, 0)
        header, tensor, raw, received = state
        if chunk.dtype != header.dtype or list(chunk.shape) != list(header.shape):
            raise InvalidInput(f"{field}: dtype or shape differs from the constant's first chunk")
        if chunk.offset != received:
            raise InvalidInput(f"{field}: chunk at byte {chunk.offset}, expected the next at byte {received}")
        end = received + len(chunk.data)
        if end > raw.nbytes:
            raise InvalidInput(f"{field}: {end} bytes sent, the constant has {raw.nbytes}")
        raw[received:end] = np.frombuffer(chunk.data, dtype=np.uint8)
        if end == raw.nbytes:
            self._open.pop(chunk.fqn, None)
            return chunk.fqn, tensor
        self._open[chunk.fqn] = (header, tensor, raw, end)
        return None

    def finish(self) -> None:
        """Raise if a constant is still missing bytes at the end of the stream."""
        for fqn, (_, _, raw, received) in self._open.items():
            raise InvalidInput(f"chunks[{shown(fqn)}]: stream ended after {received} of {raw.nbytes} bytes")


def chunk_tensor(fqn: str, tensor: torch.Tensor, chunk_bytes: int) -> list[pb.TensorChunk]:
    """Split one tensor into chunks of at most `chunk_bytes` data bytes."""
    wire = tensor_to_pb(tensor)
    data = wire.data
    pieces = range(0, max(len(data), 1), chunk_bytes)
    return [
        pb.TensorChunk(
            fqn=fqn, dtype=wire.dtype, shape=wire.shape, offset=start, data=data[start : start + chunk_bytes]
        )
        for start in pieces
    ]
