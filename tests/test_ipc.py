"""The front end ⇄ engine wire (service/ipc.py) and the front end's side of it
(service/remote.py), with the test playing the engine on the other end of a real
Unix socket pair: every frame is read back exactly as the engine would."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pt2serve.loader.dtypes import TYPES, RawTensor
from pt2serve.loader.errors import ErrorKind, InvalidInput, Pt2ServeError, Unavailable
from pt2serve.loader.schema import Dim, ModelSchema, TensorSpec
from pt2serve.scheduler.dataplane import InferenceOptions, InferenceResult
from pt2serve.scheduler.telemetry import NoTelemetry
from pt2serve.service import ipc, links
from pt2serve.service.remote import EnginePlane, _EngineLink

SHAPES = st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=4)


def tensor_of(dtype_index: int, shape: list[int]) -> torch.Tensor:
    element = TYPES[dtype_index]
    raw = torch.arange(math.prod(shape) * element.itemsize, dtype=torch.uint8) % 251
    return raw.view(element.torch).reshape(shape) if shape else raw[: element.itemsize].view(element.torch)[0]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and bits (arbitrary bytes make NaNs, which never equal themselves)."""
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def raw_of(tensor: torch.Tensor) -> RawTensor:
    """`tensor` as a front end decodes it from a client's message."""
    return RawTensor(tensor.dtype, tuple(tensor.shape), bits(tensor.contiguous()).numpy().tobytes())


def joined(parts: list[object]) -> bytes:
    return b"".join(bytes(p) for p in parts)  # type: ignore[call-overload]


def framed(parts: list[object]) -> bytearray:
    """The payload of one frame, as FrameReader hands it over."""
    (frame,) = links.FrameReader().feed(joined(parts))
    return frame


@settings(max_examples=100, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(0, len(TYPES) - 1), SHAPES), min_size=0, max_size=3),
    priority=st.integers(0, 2**64 - 1),
    timeout=st.one_of(st.none(), st.floats(0.001, 100)),
    deadline=st.one_of(st.none(), st.floats(0, 1e6)),
)
def test_requests_and_results_cross_unchanged(
    shapes: list[tuple[int, list[int]]], priority: int, timeout: float | None, deadline: float | None
) -> None:
    inputs = {f"in{i}": tensor_of(d, s) for i, (d, s) in enumerate(shapes)}
    parts = ipc.pack_request(
        7, "mödel", inputs, priority=priority, timeout_s=timeout, deadline=deadline, output_names=("a", "b")
    )
    request = ipc.unpack_request(framed(parts))
    assert (request.request_id, request.model, request.priority) == (7, "mödel", priority)
    assert (request.timeout_s, request.deadline, request.output_names) == (timeout, deadline, ("a", "b"))
    assert list(request.inputs) == list(inputs)
    # The engine keeps the inputs as views of the frame's bytes.
    raw = {n: raw_of(t) for n, t in inputs.items()}
    assert request.inputs == raw
    for name, tensor in inputs.items():
        assert same_bytes(request.inputs[name].tensor(), tensor)
    # A front end sends the client's bytes as they came, and keeps the answer's as
    # bytes: the frames are the same as from torch tensors, and so are the bytes.
    options = {"priority": priority, "timeout_s": timeout, "deadline": deadline, "output_names": ("a", "b")}
    assert joined(ipc.pack_request(7, "mödel", raw, **options)) == joined(parts)  # type: ignore[arg-type]
    request_id, version, answers = ipc.unpack_raw_result(framed(ipc.pack_result(9, 3, inputs)))
    assert (request_id, version, list(answers)) == (9, 3, list(inputs))
    assert answers == raw


def test_client_values_past_every_narrow_width_cross_unchanged() -> None:
    """What a client controls is carried in fields wide enough for any value its
    message can hold: here past a u16 length, a u8 count, a u8 ndim."""
    model = "é" * 40_000  # 80,000 bytes
    outputs = tuple(f"out{i}" for i in range(300))
    deep = RawTensor(torch.float32, (1,) * 300, bytes(4))
    inputs = {f"in{i}": RawTensor(torch.int8, (1,), b"\1") for i in range(300)} | {"deep": deep}
    parts = ipc.pack_request(
        1, model, inputs, priority=2**64 - 1, timeout_s=None, deadline=None, output_names=outputs
    )
    request = ipc.unpack_request(framed(parts))
    assert (request.model, request.priority, request.output_names) == (model, 2**64 - 1, outputs)
    assert request.inputs == inputs


@given(kind=st.sampled_from(list(ErrorKind)), message=st.text(max_size=300))
def test_errors_cross_with_their_kind_and_message(kind: ErrorKind, message: str) -> None:
    request_id, error = ipc.unpack_error(framed(ipc.pack_error(5, ipc.error_of(kind, message))))
    assert request_id == 5 and error.kind is kind and str(error) == message


def test_a_dtype_the_wire_does_not_carry_is_refused_by_name() -> None:
    z = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(InvalidInput, match=r"inputs\['z'\]: dtype torch.complex64 cannot be sent"):
        ipc.pack_request(1, "m", {"z": z}, priority=0, timeout_s=None, deadline=None, output_names=())
    with pytest.raises(InvalidInput, match=r"outputs\['y'\]: dtype torch.complex64 cannot be sent"):
        ipc.pack_result(1, 0, {"x": torch.zeros(2), "y": z})


def test_frames_split_anywhere_are_read_whole() -> None:
    data = b"".join(bytes(p) for p in ipc.pack_cancel(1) + ipc.pack_cancel(2) + ipc.pack_cancel(3))
    reader = links.FrameReader()
    frames = [f for i in range(len(data)) for f in reader.feed(data[i : i + 1])]
    assert [ipc.unpack_id(f) for f in frames] == [1, 2, 3]


class RecordingLink(links.SocketLink):
    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, asyncio.get_running_loop())
        self.frames: list[bytes] = []
        self.lost: asyncio.Future[Exception | None] = self.loop.create_future()

    def received(self, frame: bytearray) -> None:
        self.frames.append(bytes(frame))

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost called twice"
        self.lost.set_result(exc)


def read_all(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(30)  # lost bytes fail the test, not hang it
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(1 << 20)
        assert chunk, "closed early"
        data += chunk
    return bytes(data)


async def test_frames_written_from_many_threads_arrive_whole_and_in_order() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = RecordingLink(ours)
    threads, per_thread = 4, 12

    def frame(thread: int, seq: int) -> list[object]:
        # Sizes up to 600 kB: together far more than the socket holds, so writes
        # stall half-way through a frame and the rest must queue in order.
        size = (seq * 7919 + thread * 104729) % 600_000
        message = bytes([65 + thread]) * size
        return ipc.pack_error(thread * 1000 + seq, InvalidInput(message.decode()))

    frames = {(t, i): frame(t, i) for t in range(threads) for i in range(per_thread)}
    total = sum(len(joined(f)) for f in frames.values())

    def write(thread: int) -> None:
        for seq in range(per_thread):
            link.write(frames[thread, seq])

    writers = [threading.Thread(target=write, args=(t,)) for t in range(threads)]
    for writer in writers:
        writer.start()
    link.send(ipc.pack_cancel(99))  # and the loop's own, meanwhile
    for writer in writers:
        await asyncio.to_thread(writer.join)
    # Nobody has read yet: most of it waits on the link, for the loop to write.
    data = await asyncio.to_thread(read_all, theirs, total + len(joined(ipc.pack_cancel(99))))
    read = list(links.FrameReader().feed(data))
    assert [f for f in read if f[:1] == ipc.CANCEL] == [framed(ipc.pack_cancel(99))]
    errors = [ipc.unpack_error(f) for f in read if f[:1] == ipc.ERROR]
    assert len(errors) == threads * per_thread
    for thread in range(threads):
        mine = [(i, e) for i, e in errors if i // 1000 == thread]
        assert [i % 1000 for i, _ in mine] == list(range(per_thread))  # in order
        for i, error in mine:
            sent_id, sent = ipc.unpack_error(framed(frames[thread, i % 1000]))
            assert (i, str(error)) == (sent_id, str(sent))
    theirs.close()
    assert await link.lost is None


async def test_a_closed_link_takes_writes_quietly_and_says_lost_once() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link = RecordingLink(ours)
    theirs.sendall(joined(ipc.pack_cancel(7)))
    theirs.close()
    assert await link.lost is None
    assert [ipc.unpack_id(f) for f in link.frames] == [7]
    await asyncio.to_thread(link.write, ipc.pack_cancel(8))  # no error, nothing sent
    link.send(ipc.pack_cancel(9), now=True)
    link.close()
    assert link.closed


SCHEMA = ModelSchema(
    inputs=(TensorSpec("x", "float32", (Dim(None, 1, 8), Dim(4))),),
    outputs=(TensorSpec("y", "float32", (Dim(None, 1, 8), Dim(2))),),
    batched=True,
)


@dataclass
class Engine:
    """The test's end of the socket, reading frames as the engine does."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    plane: EnginePlane
    frames: links.FrameReader
    read: list[bytearray]
    unexpected: list[None]  # one entry per answer the front end did not expect

    async def next_frame(self) -> bytearray:
        while not self.read:
            data = await self.reader.read(65536)
            assert data, "the front end closed the connection"
            self.read += self.frames.feed(data)
        return self.read.pop(0)

    async def send(self, parts: list[object]) -> None:
        self.writer.writelines(parts)  # type: ignore[arg-type]
        await self.writer.drain()


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    unexpected: list[None] = []
    plane = EnginePlane(NoTelemetry(), lambda: unexpected.append(None))
    lost: asyncio.Future[None] = loop.create_future()
    await loop.create_unix_connection(lambda: _EngineLink(plane, lost), sock=theirs)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    test_engine = Engine(reader, writer, plane, links.FrameReader(), [], unexpected)
    told = asyncio.Event()
    plane.changed = told.set
    await test_engine.send(ipc.pack_state(ipc.EngineState(True, {"m": ipc.ModelView(SCHEMA, 8)})))
    await told.wait()
    assert plane.ready
    try:
        yield test_engine
    finally:
        writer.close()
        await lost


def decode(x: torch.Tensor) -> object:
    return lambda: ({"x": x}, InferenceOptions(output_names=("y",)))


async def test_a_request_goes_out_once_and_its_answer_comes_back(engine: Engine) -> None:
    x = torch.randn(3, 4)
    call = asyncio.ensure_future(engine.plane.infer("m", decode(x)))  # type: ignore[arg-type]
    request = ipc.unpack_request(await engine.next_frame())
    assert (
        request.model == "m"
        and request.output_names == ("y",)
        and torch.equal(request.inputs["x"].tensor(), x)
    )
    y = torch.randn(3, 2)
    await engine.send(ipc.pack_result(request.request_id, 4, {"y": y}))
    result = await call
    answer = result.outputs["y"]
    assert isinstance(answer, RawTensor)  # the front end encodes it without torch
    assert result.constants_version == 4 and torch.equal(answer.tensor(), y)
    assert engine.plane.in_flight == 0


async def test_a_bad_request_never_reaches_the_engine(engine: Engine) -> None:
    with pytest.raises(InvalidInput, match="input 'x'"):
        await engine.plane.infer("m", decode(torch.randn(3, 5)))  # type: ignore[arg-type]
    assert engine.plane.in_flight == 0
    # The next frame the engine sees is the good request sent after it.
    call = asyncio.ensure_future(engine.plane.infer("m", decode(torch.randn(1, 4))))  # type: ignore[arg-type]
    request = ipc.unpack_request(await engine.next_frame())
    assert request.inputs["x"].shape == (1, 4)
    await engine.send(ipc.pack_error(request.request_id, Unavailable("draining")))
    with pytest.raises(Unavailable, match="draining"):
        await call


async def test_a_cancelled_call_withdraws_its_request(engine: Engine) -> None:
    call = asyncio.ensure_future(engine.plane.infer("m", decode(torch.randn(1, 4))))  # type: ignore[arg-type]
    request = ipc.unpack_request(await engine.next_frame())
    call.cancel()
    assert ipc.unpack_id(await engine.next_frame()) == request.request_id  # the cancel frame
    assert engine.plane.in_flight == 0
    # A late answer for it is dropped, as expected.
    await engine.send(ipc.pack_result(request.request_id, 0, {"y": torch.zeros(1, 2)}))
    with pytest.raises(asyncio.CancelledError):
        await call
    await _round_trip(engine)
    assert engine.unexpected == []


async def _round_trip(engine: Engine) -> None:
    """One more request answered: every frame sent before it has been read."""
    call = asyncio.ensure_future(engine.plane.infer("m", decode(torch.randn(1, 4))))  # type: ignore[arg-type]
    request = ipc.unpack_request(await engine.next_frame())
    await engine.send(ipc.pack_result(request.request_id, 0, {"y": torch.zeros(1, 2)}))
    await call


async def test_an_answer_nobody_waits_for_is_counted(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    call = asyncio.ensure_future(engine.plane.infer("m", decode(torch.randn(1, 4))))  # type: ignore[arg-type]
    request = ipc.unpack_request(await engine.next_frame())
    answer = ipc.pack_result(request.request_id, 0, {"y": torch.zeros(1, 2)})
    await engine.send(answer)
    await call
    await engine.send(answer)  # answered twice
    await engine.send(ipc.pack_result(10_000, 0, {"y": torch.zeros(1, 2)}))  # never sent
    await _round_trip(engine)
    assert len(engine.unexpected) == 2
    assert "is not waiting for" in caplog.text


async def test_a_lost_engine_answers_every_waiting_request_unavailable(engine: Engine) -> None:
    heard: list[InferenceResult | BaseException] = []
    calls = [asyncio.ensure_future(engine.plane.infer("m", decode(torch.randn(1, 4)))) for _ in range(3)]  # type: ignore[arg-type]
    engine.plane.submit("m", decode(torch.randn(1, 4)), heard.append)  # type: ignore[arg-type]
    for _ in range(4):
        await engine.next_frame()
    engine.writer.close()
    for call in calls:
        with pytest.raises(Unavailable, match="engine process stopped"):
            await call
    assert len(heard) == 1 and isinstance(heard[0], Pt2ServeError)
    assert not engine.plane.ready and engine.plane.in_flight == 0
    with pytest.raises(Unavailable, match="not ready"):
        await engine.plane.infer("m", decode(torch.randn(1, 4)))  # type: ignore[arg-type]


async def test_a_starved_front_end_tells_the_engine_when_that_changes(engine: Engine) -> None:
    engine.plane.set_starved(True)
    frame = await engine.next_frame()
    assert frame[:1] == ipc.STARVED and ipc.unpack_starved(frame)
    engine.plane.set_starved(False)
    frame = await engine.next_frame()
    assert frame[:1] == ipc.STARVED and not ipc.unpack_starved(frame)
