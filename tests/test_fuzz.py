"""Fuzzing a live server with malformed requests (unary and streaming): every one
gets the status an oracle predicts, the server never dies, and a valid request
still succeeds afterwards."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pt2serve.scheduler.manager import ModelConfig
from pt2serve.service.config import ServerConfig
from pt2serve.service.demo import demo_model
from pt2serve.service.pb import grpc_service_pb2 as v2
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.server import Pt2Server
from tests.conftest import CACHE, LAYOUTS, Packages, models_toml

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


@pytest.fixture(scope="module", params=LAYOUTS)
def live(
    request: pytest.FixtureRequest, packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server on every layout, driven synchronously by Hypothesis: the one-process
    server on its own event loop in a thread, or a supervised one (front ends and
    an engine) in processes of its own."""
    models = (ModelConfig("demo", str(packages.demo)), ModelConfig("two", str(packages.two_input)))
    if request.param == "one-process":
        yield from _in_process(models)
        return
    from tests.fleet import Replica

    config = f'frontends = 2\nmax_message_mb = {MAX_MESSAGE >> 20}\nmodel_root = "{CACHE}"\n'
    replica = Replica(tmp_path_factory.mktemp("fuzz"), "fuzzed", config + models_toml(models))
    replica.start()
    try:
        replica.wait_ready()
        with grpc.insecure_channel(replica.address) as channel:
            yield LiveServer(replica.address, channel, pb_grpc.InferenceStub(channel))
        assert replica.stop() == 0, replica.log.read_text()[-3000:]
    finally:
        replica.kill()


def _in_process(models: tuple[ModelConfig, ...]) -> Iterator[LiveServer]:
    loop = asyncio.new_event_loop()
    config = ServerConfig(
        grpc_port=0, metrics_port=0, model_root=str(CACHE), max_message_bytes=MAX_MESSAGE, models=models
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


# ------------------------------------------------ every field of every RPC
LOADED = ("demo", "two")
# Values that have broken servers: NUL bytes, huge names, paths that leave the root.
# "é" * 40_000 is 40,000 characters and 80,000 bytes: past a u16 length in bytes.
AWKWARD_TEXT = [
    "",
    "x",
    "\0",
    "a\0b",
    "m" * 200_000,
    "é" * 40_000,
    "../" * 4 + "etc/passwd",
    "/etc/passwd",
    "é☃",
]
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SINT32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_ENUM: (-(1 << 31), (1 << 31) - 1),
    FieldDescriptor.TYPE_INT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SINT64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(1 << 63), (1 << 63) - 1),
    FieldDescriptor.TYPE_UINT32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_FIXED32: (0, (1 << 32) - 1),
    FieldDescriptor.TYPE_UINT64: (0, (1 << 64) - 1),
    FieldDescriptor.TYPE_FIXED64: (0, (1 << 64) - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, high, -1, 0, 1, 2, 16, 127, 128, 255, 256, 1000, 1 << 20) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


# Fields whose meaningful values random text would never hit.
MEANINGFUL_TEXT = {
    "datatype": ["INT8", "UINT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64", "BOOL", "BYTES"],
    "fqn": ["hidden.weight", "out.weight", "out.bias"],
    "name": ["x", "features", "ids", "logits", "hidden.weight"],
}


def _scalar(field: FieldDescriptor, known_names: bool) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        texts = [*AWKWARD_TEXT, *MEANINGFUL_TEXT.get(field.name, ()), *(LOADED if known_names else ())]
        return st.one_of(st.sampled_from(texts), st.text(max_size=12))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=80)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    return _integers(*INT_RANGES[kind])


def fields_of(descriptor: Descriptor, known_names: bool, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """A dict of field values for `descriptor`: any subset of its fields, each with
    values of its wire type (nested messages up to three levels)."""
    entries: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None:
            if depth >= 3:
                continue
            options = field.message_type.GetOptions()
            if options.map_entry:
                key_field, value_field = field.message_type.fields
                value = _value(value_field, known_names, depth + 1)
                keys = st.one_of(
                    st.sampled_from(["x", "features", "ids", "priority", "timeout"]), st.text(max_size=8)
                )
                entries[field.name] = st.dictionaries(keys, value, max_size=3)
                continue
        value = _value(field, known_names, depth + 1)
        entries[field.name] = st.lists(value, max_size=3) if _repeated(field) else value
    return st.fixed_dictionaries({}, optional=entries)


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.label == FieldDescriptor.LABEL_REPEATED)


def _value(field: FieldDescriptor, known_names: bool, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        return fields_of(field.message_type, known_names, depth)
    return _scalar(field, known_names)


def _build_message(cls: Any, values: dict[str, Any]) -> Any:
    message = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            target = getattr(message, name)
            for key, item in value.items():
                if value_field.message_type is not None:
                    target[key].CopyFrom(_build_message(_class_of(value_field.message_type), item))
                else:
                    target[key] = item
        elif field.message_type is not None:
            items = value if _repeated(field) else [value]
            built = [_build_message(_class_of(field.message_type), item) for item in items]
            if _repeated(field):
                getattr(message, name).extend(built)
            else:
                getattr(message, name).CopyFrom(built[0])
        elif _repeated(field):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


def _class_of(descriptor: Descriptor) -> Any:
    return message_factory.GetMessageClass(descriptor)


# Methods that would take a served model away when given its name: fuzzed with
# other names only, so a later case still finds the models.
DESTRUCTIVE = {"UnloadModel", "RepositoryModelUnload", "RepositoryModelLoad"}
METHODS = [
    (service.full_name, method)
    for module in (pb, v2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]


@st.composite
def rpc_cases(draw: st.DrawFn) -> tuple[str, MethodDescriptor, list[Any]]:
    service, method = draw(st.sampled_from(METHODS))
    known = method.name not in DESTRUCTIVE
    count = draw(st.integers(0, 3)) if method.client_streaming else 1
    cls = _class_of(method.input_type)
    messages = [_build_message(cls, draw(fields_of(method.input_type, known))) for _ in range(count)]
    return service, method, messages


def _examples(cases: list[Any]) -> Any:
    def decorate(test: Any) -> Any:
        for case in reversed(cases):
            test = example(case=case)(test)
        return test

    return decorate


REFUSABLE_NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


def _case(service: str, method: str, *messages: Any) -> tuple[str, MethodDescriptor, list[Any]]:
    (descriptor,) = [m for s, m in METHODS if s == service and m.name == method]
    return service, descriptor, list(messages)


def _many_inputs(model: str, count: int) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model)
    for i in range(count):
        request.inputs.add(name=f"in{i}", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(b"\0" * 4)
    return request


def _typed_input(datatype: str, **contents: list[int]) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name="demo")
    request.inputs.add(name="x", datatype=datatype, shape=[1], contents=v2.InferTensorContents(**contents))
    return request


KSERVE = "inference.GRPCInferenceService"
LOADER = "pt2serve.v1.ModelLoader"
HUGE_NAME = "m" * 200_000
# Cases that once answered UNKNOWN (or an error the client could not even receive),
# run first every time.
KNOWN_CASES = [
    _case(KSERVE, "ModelInfer", _typed_input("INT8", int_contents=[1000])),
    _case(KSERVE, "ModelInfer", _typed_input("INT16", int_contents=[-40000])),
    _case(KSERVE, "ModelInfer", _typed_input("UINT8", uint_contents=[256])),
    _case(LOADER, "LoadModel", pb.LoadModelRequest(name="n", package_path="a\0b")),
    _case(LOADER, "LoadMetadataFromPackage", pb.LoadMetadataFromPackageRequest(package_path="\0")),
    _case(LOADER, "LoadConstantsFromFile", pb.LoadConstantsFromFileRequest(name="demo", path="w\0")),
    _case(KSERVE, "RepositoryModelLoad", v2.RepositoryModelLoadRequest(model_name="a\0b")),
    _case("pt2serve.v1.Inference", "Run", pb.RunRequest(model=HUGE_NAME)),
    _case(KSERVE, "ModelInfer", v2.ModelInferRequest(model_name=HUGE_NAME)),
    _case(LOADER, "GetMetadata", pb.GetMetadataRequest(name=HUGE_NAME)),
    # Past each fixed width the engine's frames once had (service/ipc.py): a length
    # in bytes, a count of outputs and of inputs, a priority.
    _case("pt2serve.v1.Inference", "Run", pb.RunRequest(model="é" * 40_000)),
    _case(
        "pt2serve.v1.Inference",
        "Run",
        pb.RunRequest(model="missing", output_names=[f"o{i}" for i in range(300)]),
    ),
    _case(KSERVE, "ModelInfer", _many_inputs("missing", 300)),
    _case("pt2serve.v1.Inference", "Run", pb.RunRequest(model="missing", priority=(1 << 32) - 1)),
]


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(case=rpc_cases())
@_examples(KNOWN_CASES)
def test_no_rpc_answers_unknown_or_internal(
    live: LiveServer, case: tuple[str, MethodDescriptor, list[Any]]
) -> None:
    """Any values in any field of any RPC (native and KServe): refusals carry a
    precise code, never UNKNOWN or INTERNAL, and the server keeps serving."""
    service, method, messages = case
    path = f"/{service}/{method.name}"
    response_cls = _class_of(method.output_type)
    serialize = _class_of(method.input_type).SerializeToString
    kinds = {
        (False, False): live.channel.unary_unary,
        (True, False): live.channel.stream_unary,
        (False, True): live.channel.unary_stream,
        (True, True): live.channel.stream_stream,
    }
    call = kinds[method.client_streaming, method.server_streaming](
        path, request_serializer=serialize, response_deserializer=response_cls.FromString
    )
    request: Any = iter(messages) if method.client_streaming else messages[0]
    try:
        result = call(request, timeout=60)
        if method.server_streaming:
            answers = list(result)
            if service == "pt2serve.v1.Inference":
                codes = {
                    grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == a.error.code))
                    for a in answers
                    if a.WhichOneof("result") == "error"
                }
                assert not codes & REFUSABLE_NEVER, (path, codes, messages)
    except grpc.RpcError as exc:
        code = exc.code()  # type: ignore[attr-defined]
        details = exc.details() or ""  # type: ignore[attr-defined]
        assert code not in REFUSABLE_NEVER, (path, code, details, messages)
        # Echoed values are cut: a message never outgrows what clients accept.
        assert 0 < len(details) <= 1000, (path, code, len(details))
    _still_serving(live)
