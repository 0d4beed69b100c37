"""Fuzzing a live server with malformed requests (unary and streaming): every one
gets the status an oracle predicts, the server never dies, and a valid request
still succeeds afterwards."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.manager import ModelConfig
from service.config import ServerConfig
from service.demo import demo_model
from service.pb import pt2serve_pb2 as pb
from service.pb import pt2serve_pb2_grpc as pb_grpc
from service.server import Pt2Server
from tests.conftest import CACHE, Packages

MAX_MESSAGE = 1 << 20
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
ITEMSIZE = {
    pb.FLOAT32: 4,
    pb.FLOAT16: 2,
    pb.BFLOAT16: 2,
    pb.FLOAT64: 8,
    pb.INT8: 1,
    pb.INT16: 2,
    pb.INT32: 4,
    pb.INT64: 8,
    pb.UINT8: 1,
    pb.BOOL: 1,
}


@dataclass
class LiveServer:
    target: str
    channel: grpc.Channel
    stub: pb_grpc.InferenceStub


@pytest.fixture(scope="module")
def live(packages: Packages) -> Iterator[LiveServer]:
    """A server on its own event loop in a thread, so Hypothesis can drive it synchronously."""
    loop = asyncio.new_event_loop()
    config = ServerConfig(
        grpc_port=0,
        metrics_port=0,
        model_root=str(CACHE),
        max_message_bytes=MAX_MESSAGE,
        models=(ModelConfig("demo", str(packages.demo)), ModelConfig("two", str(packages.two_input))),
    )
    server = Pt2Server(config)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=120)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield LiveServer(f"127.0.0.1:{server.port}", channel, pb_grpc.InferenceStub(channel))
    finally:
        channel.close()
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


# A request is a model name and named tensors (dtype, shape, byte-length error, fill).
tensor = st.tuples(
    st.sampled_from(
        [pb.FLOAT32, pb.FLOAT32, pb.FLOAT64, pb.INT64, pb.BFLOAT16, pb.BOOL, pb.DTYPE_UNSPECIFIED, 42]
    ),
    st.lists(st.sampled_from([-3, 0, 1, 2, 3, 8, 16, 65, 1 << 40]), min_size=0, max_size=3),
    st.sampled_from([0, 0, 0, -1, 1, 7]),
    st.sampled_from([0.0, float("nan"), float("inf"), -1e30]),
)
request_plan = st.tuples(
    st.sampled_from(["demo", "demo", "demo", "two", "missing", ""]),
    st.dictionaries(st.sampled_from(["x", "x", "features", "ids", "y", ""]), tensor, max_size=3),
)


def build(
    plan: tuple[str, dict[str, tuple[int, list[int], int, float]]],
) -> tuple[pb.RunRequest, grpc.StatusCode]:
    """The request and the status the server must answer with."""
    model, tensors = plan
    request = pb.RunRequest(model=model)
    decode_error = False
    shapes: dict[str, tuple[int, list[int]]] = {}
    for name, (dtype, shape, delta, fill) in tensors.items():
        size = ITEMSIZE.get(dtype)
        numel = math.prod(shape) if all(d >= 0 for d in shape) else -1
        # Large tensors are sent with 8 bytes: the server refuses them by shape or
        # length, and every message stays under the 1 MB limit.
        span = math.prod(max(d, 1) for d in shape) * (size or 1)  # refused above the 1 GiB tensor limit
        if size is None or numel < 0 or numel * size > 1 << 18 or span > 1 << 30:
            data = b"\0" * 8
            decode_error = True
        else:
            data = _fill(dtype, numel, fill)[: max(0, numel * size + delta)] + b"\0" * max(0, delta)
            decode_error |= len(data) != numel * size
        request.inputs[name].CopyFrom(pb.Tensor(dtype=dtype, shape=shape, data=data))  # type: ignore[arg-type]
        shapes[name] = (dtype, shape)
    if decode_error:
        return request, INVALID
    if model not in ("demo", "two"):
        return request, grpc.StatusCode.NOT_FOUND
    return request, OK if _valid(model, shapes) else INVALID


def _fill(dtype: int, numel: int, fill: float) -> bytes:
    if dtype in (pb.FLOAT32, pb.FLOAT64):
        torch_dtype = torch.float32 if dtype == pb.FLOAT32 else torch.float64
        return torch.full((numel,), fill, dtype=torch_dtype).numpy().tobytes()
    return bytes(numel * ITEMSIZE[dtype])


def _valid(model: str, shapes: dict[str, tuple[int, list[int]]]) -> bool:
    expected = {"demo": {"x": (pb.FLOAT32, 16)}, "two": {"features": (pb.FLOAT32, 8), "ids": (pb.INT64, 3)}}[
        model
    ]
    if set(shapes) != set(expected):
        return False
    rows = {shape[0] for _, shape in shapes.values() if len(shape) == 2}
    for name, (dtype, shape) in shapes.items():
        want_dtype, width = expected[name]
        if dtype != want_dtype or len(shape) != 2 or shape[1] != width:
            return False
    limit = 64 if model == "demo" else 32
    return len(rows) == 1 and 1 <= rows.pop() <= limit


def _still_serving(live: LiveServer) -> None:
    x = torch.randn(2, 16)
    request = pb.RunRequest(
        model="demo", inputs={"x": pb.Tensor(dtype=pb.FLOAT32, shape=[2, 16], data=x.numpy().tobytes())}
    )
    out = live.stub.Run(request, timeout=30).outputs["logits"]
    got = torch.frombuffer(bytearray(out.data), dtype=torch.float32).reshape(2, 4)
    torch.testing.assert_close(got, demo_model()(x))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=st.lists(request_plan, min_size=1, max_size=8))
def test_unary_fuzz(
    live: LiveServer, plans: list[tuple[str, dict[str, tuple[int, list[int], int, float]]]]
) -> None:
    for plan in plans:
        request, expected = build(plan)
        try:
            live.stub.Run(request, timeout=30)
            code = OK
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            assert exc.details(), "every refusal says why"  # type: ignore[attr-defined]
        assert code == expected, (plan, code)
    _still_serving(live)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=st.lists(request_plan, min_size=1, max_size=20))
def test_stream_fuzz(
    live: LiveServer, plans: list[tuple[str, dict[str, tuple[int, list[int], int, float]]]]
) -> None:
    built = [build(plan) for plan in plans]
    requests = []
    for i, (request, _) in enumerate(built):
        request.request_id = f"q{i}"
        requests.append(request)
    answers = {a.request_id: a for a in live.stub.RunStream(iter(requests), timeout=60)}
    assert len(answers) == len(requests)
    for i, (_, expected) in enumerate(built):
        answer = answers[f"q{i}"]
        code = (
            OK
            if answer.WhichOneof("result") == "response"
            else grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == answer.error.code))
        )
        assert code == expected, (plans[i], code, answer.error.message)
    _still_serving(live)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=256))
def test_garbage_bytes_never_crash_the_server(live: LiveServer, garbage: bytes) -> None:
    call = live.channel.unary_unary("/pt2serve.v1.Inference/Run")
    try:
        call(garbage, timeout=30)
        code = OK
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
    # Unparseable bytes and parseable ones with bad tensors are INVALID_ARGUMENT;
    # parseable ones naming no served model are NOT_FOUND.
    assert code in {INVALID, grpc.StatusCode.NOT_FOUND}, code
    _still_serving(live)


def test_oversized_messages_are_refused(live: LiveServer) -> None:
    big = pb.RunRequest(
        model="demo", inputs={"x": pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 19], data=bytes(1 << 21))}
    )
    with pytest.raises(grpc.RpcError) as info:
        live.stub.Run(big, timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    _still_serving(live)


def test_garbage_on_a_stream_ends_it_with_invalid_argument(live: LiveServer) -> None:
    call = live.channel.stream_stream("/pt2serve.v1.Inference/RunStream")
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter([b"\x00\x01\x02"]), timeout=30))
    assert info.value.code() == INVALID  # type: ignore[attr-defined]
    assert "not a valid protobuf message" in info.value.details()  # type: ignore[attr-defined]
    _still_serving(live)
