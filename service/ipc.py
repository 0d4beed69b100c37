"""The front end ⇄ engine wire: length-prefixed frames on a Unix stream socket.

A Unix socket was chosen by measurement (bench/transport.py, docs/performance.md):
the cheapest round trip of the three tried, in CPU and in latency. Tensor bytes
cross as they are: a frame is written as a list of buffers (the tensors' own memory,
or a front end's client bytes; no per-element copy) and read back on either side as
views into the received frame: the engine's runner threads join them into batch
tensors, a front end copies them into its responses. The socket's two ends, and
how frames are cut and written, are in service/links.py.

Frames (little-endian), each `u32 length` then the payload:

    request   'R' u64 id, f64 deadline, f64 timeout (NaN: none), u64 priority,
              str model, u32 n, n*str output, u32 n, n*(str name, tensor)
    cancel    'C' u64 id
    result    'O' u64 id, u64 constants version, u32 n, n*(str name, tensor)
    error     'E' u64 id, u8 error kind, str message (u32 length)
    state     'S' pickled EngineState (engine to front end, on connect and change)
    starved   'P' u8 0|1: the front end's event loop is (no longer) starved for CPU
              (service/contention.py), sent when that changes

    str       u32 length, UTF-8;  tensor  u8 dtype, u32 ndim, ndim*i64, u64 nbytes, bytes

Every field a client's value can reach is wide enough for any value the client's
message can carry, so no request fails in the codec (decided here, not where
requests are checked): lengths and counts are u32 (a gRPC message is below 4 GiB;
ids, constants versions and byte counts are u64; a priority is a protobuf uint32
(pt2serve.v1) or uint64 (KServe), so u64; dims are protobuf int64, so i64; deadlines
and timeouts are f64. The dtype code and error kind are the server's own.
"""

from __future__ import annotations

import math
import pickle
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from pt2serve.loader.dtypes import TYPES, AnyTensor, RawTensor
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
from pt2serve.service.links import LENGTH

REQUEST, CANCEL, RESULT, ERROR, STATE, STARVED = b"R", b"C", b"O", b"E", b"S", b"P"
_REQUEST = struct.Struct("<cQddQ")
_ID = struct.Struct("<cQ")
_RESULT = struct.Struct("<cQQ")
_ERROR = struct.Struct("<cQB")
_U32 = struct.Struct("<I")
_STR = _COUNT = _U32
_DTYPE_CODE = {t.torch: i for i, t in enumerate(TYPES)}
_BFLOAT16 = _DTYPE_CODE[torch.bfloat16]
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


def _framed(parts: list[Any]) -> list[Any]:
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    parts.insert(0, LENGTH.pack(size))
    return parts


def _str(text: str) -> bytes:
    raw = text.encode()
    return _STR.pack(len(raw)) + raw


def _head_struct(ndim: int) -> struct.Struct:
    """The struct of a tensor's head: dtype code, ndim, dims, nbytes."""
    packer = _HEADS.get(ndim)
    if packer is None:
        packer = _HEADS[ndim] = struct.Struct(f"<BI{ndim}qQ")
    return packer


_HEADS: dict[int, struct.Struct] = {}


def _tensor_head(code: int, shape: Sequence[int], nbytes: int) -> bytes:
    return _head_struct(len(shape)).pack(code, len(shape), *shape, nbytes)


def _tensor_parts(tensor: torch.Tensor, code: int, head: bytes, parts: list[Any]) -> int:
    """Append `head` and the tensor's own head as one buffer, then its bytes (a view,
    no copy, for a contiguous tensor); returns the bytes appended. Runs for every
    output of every answer on the engine's loop: a handful of calls."""
    array = (tensor.view(torch.int16) if code == _BFLOAT16 else tensor).numpy()
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    nbytes: int = array.nbytes
    head += _tensor_head(code, array.shape, nbytes)
    parts.append(head)
    if nbytes:  # an empty tensor has no buffer to view (and no bytes to send)
        parts.append(memoryview(array).cast("B"))  # type: ignore[arg-type]
    return len(head) + nbytes


def _framed_tensors(head: bytes, tensors: Mapping[str, AnyTensor], field: str) -> list[Any]:
    """A frame of `head` then `u32 n, n*(str name, tensor)`: the length, then one
    buffer of heads and one of bytes per tensor. InvalidInput naming `field` for a
    dtype the wire does not carry."""
    head += _COUNT.pack(len(tensors))
    parts: list[Any] = [b""]  # the length, once known
    size = 0
    for name, tensor in tensors.items():
        code = _DTYPE_CODE.get(tensor.dtype)
        if code is None:
            raise InvalidInput(f"{field}[{name!r}]: dtype {tensor.dtype} cannot be sent")
        head += _str(name)
        if isinstance(tensor, RawTensor):  # as the client sent it: no torch call
            head += _tensor_head(code, tensor.shape, len(tensor.data))
            parts += (head, tensor.data)
            size += len(head) + len(tensor.data)
        else:
            if tensor.requires_grad or not tensor.is_cpu:
                tensor = tensor.detach().cpu()
            size += _tensor_parts(tensor, code, head, parts)
        head = b""
    if head:  # no tensors
        parts.append(head)
        size = len(head)
    parts[0] = LENGTH.pack(size)
    return parts


def _text_at(frame: bytearray, at: int) -> tuple[str, int]:
    (size,) = _STR.unpack_from(frame, at)
    start = at + 4  # u32 length
    return frame[start : start + size].decode(), start + size


def _named_tensors(frame: bytearray, at: int) -> dict[str, RawTensor]:
    """The `u32 n, n*(str name, tensor)` that ends a request or a result, as
    RawTensors over `frame` (views, which keep it alive)."""
    view = memoryview(frame)
    tensors = {}
    (count,) = _COUNT.unpack_from(frame, at)
    at += 4  # u32 count
    for _ in range(count):
        name, at = _text_at(frame, at)
        head = _head_struct(_U32.unpack_from(frame, at + 1)[0])  # after the u8 dtype, u32 ndim
        code, _, *shape, nbytes = head.unpack_from(frame, at)
        at += head.size
        tensors[name] = RawTensor(TYPES[code].torch, tuple(shape), view[at : at + nbytes])
        at += nbytes
    return tensors


# ---------------------------------------------------------------- requests
def pack_request(
    request_id: int,
    model: str,
    inputs: Mapping[str, AnyTensor],
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
    head += _str(model) + _COUNT.pack(len(output_names))
    for name in output_names:
        head += _str(name)
    return _framed_tensors(head, inputs, "inputs")


@dataclass(slots=True)  # not frozen: made for every request
class Request:
    request_id: int
    model: str
    inputs: dict[str, RawTensor]
    priority: int
    timeout_s: float | None
    deadline: float | None
    output_names: tuple[str, ...]


def unpack_request(frame: bytearray) -> Request:
    _, request_id, deadline, timeout_s, priority = _REQUEST.unpack_from(frame, 0)
    model, at = _text_at(frame, _REQUEST.size)
    outputs: tuple[str, ...] = ()
    (count,) = _COUNT.unpack_from(frame, at)
    at += 4  # u32 count
    for _ in range(count):
        name, at = _text_at(frame, at)
        outputs += (name,)
    return Request(
        request_id,
        model,
        _named_tensors(frame, at),
        priority,
        None if timeout_s != timeout_s else timeout_s,  # NaN: none
        None if deadline != deadline else deadline,
        outputs,
    )


def pack_cancel(request_id: int) -> list[Any]:
    return _framed([_ID.pack(CANCEL, request_id)])


def unpack_id(frame: bytearray) -> int:
    request_id: int = _ID.unpack_from(frame, 0)[1]
    return request_id


# --------------------------------------------------------------- responses
def pack_result(request_id: int, constants_version: int, outputs: Mapping[str, AnyTensor]) -> list[Any]:
    """An answer: the length, then for each output one buffer of heads and one of
    bytes (a view of the output's memory)."""
    return _framed_tensors(_RESULT.pack(RESULT, request_id, constants_version), outputs, "outputs")


def unpack_raw_result(frame: bytearray) -> tuple[int, int, dict[str, AnyTensor]]:
    """A result whose outputs stay bytes (RawTensor over the frame): a front end only
    copies them into its response."""
    _, request_id, version = _RESULT.unpack_from(frame, 0)
    outputs = cast(dict[str, AnyTensor], _named_tensors(frame, _RESULT.size))
    return request_id, version, outputs


def pack_error(request_id: int, error: Pt2ServeError) -> list[Any]:
    message = str(error).encode()
    return _framed(
        [_ERROR.pack(ERROR, request_id, _KINDS.index(error.kind)), _U32.pack(len(message)), message]
    )


def unpack_error(frame: bytearray) -> tuple[int, Pt2ServeError]:
    _, request_id, kind = _ERROR.unpack_from(frame, 0)
    (size,) = _U32.unpack_from(frame, _ERROR.size)
    start = _ERROR.size + _U32.size
    message = frame[start : start + size].decode()
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
