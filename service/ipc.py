"""The front end ⇄ engine wire: length-prefixed frames on a Unix stream socket.

A Unix socket was chosen by measurement (bench/transport.py, docs/performance.md):
the cheapest round trip of the three tried, in CPU and in latency. Tensor bytes
cross as they are: a frame is written as a list of buffers (the tensors' own memory,
no per-element copy) and read back with numpy views into the received frame.

Frames (little-endian), each `u32 length` then the payload:

    request   'R' u64 id, f64 deadline, f64 timeout (NaN: none), u16 priority,
              str model, u8 n, n*str output, u8 n, n*tensor
    cancel    'C' u64 id
    result    'O' u64 id, u64 constants version, u8 n, n*(str name, tensor)
    error     'E' u64 id, u8 error kind, str message (u32 length)
    state     'S' pickled EngineState (engine to front end, on connect and change)
    starved   'P' u8 0|1: the front end's event loop is (no longer) starved for CPU
              (service/contention.py), sent when that changes

    str       u16 length, UTF-8;  tensor  u8 dtype, u8 ndim, ndim*i64, u64 nbytes, bytes
"""

from __future__ import annotations

import asyncio
import math
import pickle
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from pt2serve.loader.dtypes import BY_TORCH, TYPES
from pt2serve.loader.errors import (
    AccessDenied,
    ErrorKind,
    ExecutionFailed,
    Expired,
    InvalidInput,
    ModelExists,
    ModelNotFound,
    Overloaded,
    Pt2ServeError,
    Unavailable,
    Unsupported,
)
from pt2serve.loader.schema import ModelSchema

REQUEST, CANCEL, RESULT, ERROR, STATE, STARVED = b"R", b"C", b"O", b"E", b"S", b"P"
_LENGTH = struct.Struct("<I")
_REQUEST = struct.Struct("<cQddH")
_ID = struct.Struct("<cQ")
_RESULT = struct.Struct("<cQQ")
_ERROR = struct.Struct("<cQB")
_STR = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TENSOR = struct.Struct("<BB")
_NBYTES = struct.Struct("<Q")
_COUNT = struct.Struct("<B")
_DTYPE_CODE = {t.torch: i for i, t in enumerate(TYPES)}
_KINDS = tuple(ErrorKind)
# One error class per kind, so the front end raises what the engine raised.
_ERRORS: dict[ErrorKind, type[Pt2ServeError]] = {
    ErrorKind.NOT_FOUND: ModelNotFound,
    ErrorKind.ALREADY_EXISTS: ModelExists,
    ErrorKind.INVALID_ARGUMENT: InvalidInput,
    ErrorKind.PERMISSION_DENIED: AccessDenied,
    ErrorKind.FAILED_PRECONDITION: Unsupported,
    ErrorKind.RESOURCE_EXHAUSTED: Overloaded,
    ErrorKind.DEADLINE_EXCEEDED: Expired,
    ErrorKind.UNAVAILABLE: Unavailable,
    ErrorKind.INTERNAL: ExecutionFailed,
}
NONE = math.nan


@dataclass(frozen=True, slots=True)
class ModelView:
    """What a front end needs of a served model to refuse bad requests itself."""

    schema: ModelSchema
    row_limit: int


@dataclass(frozen=True, slots=True)
class EngineState:
    ready: bool = False
    models: dict[str, ModelView] = field(default_factory=dict)


class FrameReader:
    """Cuts a byte stream into frame payloads (each a bytearray of its own: tensors
    decoded from it own writable memory, as the runtime needs)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytearray]:
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        while end - start >= 4:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if end - start - 4 < length:
                break
            yield buffer[start + 4 : start + 4 + length]
            start += 4 + length
        if start:
            del buffer[:start]


class FrameLink(asyncio.Protocol):
    """One end of the socket: frames in (`received`, one call per frame), and frames
    out, those of one loop pass in one write (`send`)."""

    def __init__(self) -> None:
        self._reader = FrameReader()
        self._out: list[Any] = []
        self._transport: asyncio.Transport | None = None
        # Kept: on Python before 3.12, each asyncio.get_running_loop() is a getpid()
        # system call (measured: several µs a request on the engine's loop).
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        for frame in self._reader.feed(data):
            if self._transport is None or self._transport.is_closing():
                return
            self.received(frame)

    def received(self, frame: bytearray) -> None:
        raise NotImplementedError

    def send(self, frame: list[Any], now: bool = False) -> None:
        """Queue a frame for the end of this loop pass, or, with `now`, write it and
        everything queued before it at once."""
        if not self._out and not now:
            self.loop.call_soon(self._flush)
        self._out.extend(frame)
        if now:
            self._flush()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(out)


def _framed(parts: list[Any]) -> list[Any]:
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    parts.insert(0, _LENGTH.pack(size))
    return parts


def _str(text: str) -> bytes:
    raw = text.encode()
    return _STR.pack(len(raw)) + raw


def _tensor_parts(tensor: torch.Tensor, parts: list[Any]) -> None:
    if tensor.dtype == torch.bfloat16:
        array = tensor.view(torch.int16).numpy()
    else:
        array = tensor.numpy()
    array = np.ascontiguousarray(array)
    # An empty tensor has no buffer to view (and no bytes to send).
    data: Any = memoryview(array).cast("B") if array.size else b""  # type: ignore[arg-type]
    shape = tensor.shape
    parts.append(
        _TENSOR.pack(_DTYPE_CODE[tensor.dtype], len(shape))
        + struct.pack(f"<{len(shape)}q", *shape)
        + _NBYTES.pack(len(data) if isinstance(data, bytes) else data.nbytes)
    )
    parts.append(data)


class _Cursor:
    __slots__ = ("frame", "at")

    def __init__(self, frame: bytearray, at: int) -> None:
        self.frame = frame
        self.at = at

    def count(self) -> int:
        value: int = self.frame[self.at]
        self.at += 1
        return value

    def text(self, wide: bool = False) -> str:
        size_struct = _U32 if wide else _STR
        (size,) = size_struct.unpack_from(self.frame, self.at)
        start = self.at + size_struct.size
        self.at = start + size
        return self.frame[start : self.at].decode()

    def tensor(self) -> torch.Tensor:
        code, ndim = _TENSOR.unpack_from(self.frame, self.at)
        shape = struct.unpack_from(f"<{ndim}q", self.frame, self.at + 2)
        start = self.at + 2 + 8 * ndim
        (nbytes,) = _NBYTES.unpack_from(self.frame, start)
        start += 8
        self.at = start + nbytes
        element = TYPES[code]
        if nbytes == 0:
            return torch.empty(shape, dtype=element.torch)
        array = np.frombuffer(self.frame, dtype=element.numpy, count=nbytes // element.itemsize, offset=start)
        tensor = torch.from_numpy(array.reshape(shape))
        return tensor.view(torch.bfloat16) if element.torch == torch.bfloat16 else tensor


# ---------------------------------------------------------------- requests
def pack_request(
    request_id: int,
    model: str,
    inputs: Mapping[str, torch.Tensor],
    *,
    priority: int,
    timeout_s: float | None,
    deadline: float | None,
    output_names: Sequence[str],
) -> list[Any]:
    head = _REQUEST.pack(
        REQUEST,
        request_id,
        NONE if deadline is None else deadline,
        NONE if timeout_s is None else timeout_s,
        priority,
    )
    text = [_str(model), _COUNT.pack(len(output_names)), *map(_str, output_names), _COUNT.pack(len(inputs))]
    parts: list[Any] = [head + b"".join(text)]
    for name, tensor in inputs.items():
        if tensor.dtype not in BY_TORCH:
            raise InvalidInput(f"inputs[{name!r}]: dtype {tensor.dtype} cannot be sent")
        parts.append(_str(name))
        _tensor_parts(tensor, parts)
    return _framed(parts)


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int
    model: str
    inputs: dict[str, torch.Tensor]
    priority: int
    timeout_s: float | None
    deadline: float | None
    output_names: tuple[str, ...]


def unpack_request(frame: bytearray) -> Request:
    _, request_id, deadline, timeout_s, priority = _REQUEST.unpack_from(frame, 0)
    cursor = _Cursor(frame, _REQUEST.size)
    model = cursor.text()
    outputs = tuple(cursor.text() for _ in range(cursor.count()))
    inputs = {}
    for _ in range(cursor.count()):
        name = cursor.text()
        inputs[name] = cursor.tensor()
    return Request(
        request_id,
        model,
        inputs,
        priority,
        None if math.isnan(timeout_s) else timeout_s,
        None if math.isnan(deadline) else deadline,
        outputs,
    )


def pack_cancel(request_id: int) -> list[Any]:
    return _framed([_ID.pack(CANCEL, request_id)])


def unpack_id(frame: bytearray) -> int:
    request_id: int = _ID.unpack_from(frame, 0)[1]
    return request_id


# --------------------------------------------------------------- responses
def pack_result(request_id: int, constants_version: int, outputs: Mapping[str, torch.Tensor]) -> list[Any]:
    parts: list[Any] = [_RESULT.pack(RESULT, request_id, constants_version) + _COUNT.pack(len(outputs))]
    for name, tensor in outputs.items():
        if tensor.requires_grad or not tensor.is_cpu:
            tensor = tensor.detach().cpu()
        parts.append(_str(name))
        _tensor_parts(tensor, parts)
    return _framed(parts)


def unpack_result(frame: bytearray) -> tuple[int, int, dict[str, torch.Tensor]]:
    _, request_id, version = _RESULT.unpack_from(frame, 0)
    cursor = _Cursor(frame, _RESULT.size)
    outputs = {}
    for _ in range(cursor.count()):
        name = cursor.text()
        outputs[name] = cursor.tensor()
    return request_id, version, outputs


def pack_error(request_id: int, error: Pt2ServeError) -> list[Any]:
    message = str(error).encode()
    return _framed(
        [_ERROR.pack(ERROR, request_id, _KINDS.index(error.kind)), _U32.pack(len(message)), message]
    )


def unpack_error(frame: bytearray) -> tuple[int, Pt2ServeError]:
    _, request_id, kind = _ERROR.unpack_from(frame, 0)
    message = _Cursor(frame, _ERROR.size).text(wide=True)
    return request_id, _ERRORS[_KINDS[kind]](message)


def error_of(kind: ErrorKind, message: str) -> Pt2ServeError:
    return _ERRORS[kind](message)


# ------------------------------------------------------------------- state
def pack_starved(starved: bool) -> list[Any]:
    return _framed([STARVED + (b"\1" if starved else b"\0")])


def unpack_starved(frame: bytearray) -> bool:
    return frame[1:2] == b"\1"


def pack_state(state: EngineState) -> list[Any]:
    return _framed([STATE + pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)])


def unpack_state(frame: bytearray) -> EngineState:
    state = pickle.loads(bytes(frame[1:]))
    if not isinstance(state, EngineState):
        raise TypeError(f"expected EngineState, got {type(state).__name__}")
    return state
