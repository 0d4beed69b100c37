"""The gRPC service against a real grpc.aio server on port 0 and real packages."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from pt2serve.service import tensors
from pt2serve.service.calls import REGISTERED, CallPolicy, Registrar
from pt2serve.service.demo import demo_model
from pt2serve.service.errors import CallsInFlight
from pt2serve.service.metrics import GrpcMetrics
from pt2serve.service.pb import grpc_service_pb2_grpc as v2_grpc
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from tests import models
from tests.conftest import Packages, Running, until


def run_request(model: str, request_id: str = "", **inputs: torch.Tensor) -> pb.RunRequest:
    return pb.RunRequest(
        model=model,
        request_id=request_id,
        inputs={name: tensors.tensor_to_pb(t) for name, t in inputs.items()},
    )


def outputs_of(response: pb.RunResponse) -> dict[str, torch.Tensor]:
    return tensors.tensors_from_pb(response.outputs, "outputs")


async def expect_error(call: object, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    return details


# ------------------------------------------------------------------ inference
async def test_unary_run_matches_eager(running: Running) -> None:
    x = torch.randn(5, 16)
    response = await running.inference.Run(run_request("demo", "r1", x=x))
    assert response.request_id == "r1" and response.model == "demo"
    torch.testing.assert_close(outputs_of(response)["logits"], demo_model()(x))


async def test_two_input_model_and_output_filter(running: Running) -> None:
    example = models.two_input_example(4)
    mixed, peak = models.make_two_input()(**example)
    response = await running.inference.Run(run_request("two", **example))
    got = outputs_of(response)
    torch.testing.assert_close(got["mixed"], mixed)
    torch.testing.assert_close(got["peak"], peak)
    request = run_request("two", **example)
    request.output_names.append("peak")
    filtered = outputs_of(await running.inference.Run(request))
    assert list(filtered) == ["peak"]


async def test_unbatched_model(running: Running) -> None:
    v = torch.randn(6)
    got = outputs_of(await running.inference.Run(run_request("vec", v=v)))
    torch.testing.assert_close(got["output"], models.make_unbatched()(v))


# Holds a runner through the in-process scheduler: one process only.
@pytest.mark.layouts("one-process")
async def test_concurrent_requests_are_batched_and_correct(running: Running) -> None:
    """40 requests queued while dispatch is held run in batches of up to 64 rows, and
    each answer equals the eager module on its own rows."""
    scheduler = running.server.manager.get("demo").scheduler
    gate = threading.Event()
    hold = asyncio.ensure_future(scheduler.exclusive(lambda: gate.wait(30), bump_version=False))
    xs = [torch.randn(1 + i % 3, 16) for i in range(40)]
    calls = asyncio.gather(*(running.inference.Run(run_request("demo", x=x)) for x in xs))

    async def all_queued() -> bool:
        return scheduler.queue_depth == len(xs)

    await until(all_queued, "40 requests to queue")
    gate.set()
    await hold
    responses = await calls
    eager = demo_model()
    for x, response in zip(xs, responses, strict=True):
        torch.testing.assert_close(outputs_of(response)["logits"], eager(x))
    assert scheduler.stats.requests == 40
    assert scheduler.stats.batches == 2  # 79 rows: 64, then the rest


async def test_stream_answers_each_request_and_survives_errors(running: Running) -> None:
    xs = {f"id{i}": torch.randn(1 + i % 4, 16) for i in range(12)}

    async def requests() -> AsyncIterator[pb.RunRequest]:
        for rid, x in xs.items():
            yield run_request("demo", rid, x=x)
            if rid == "id5":
                yield run_request("demo", "bad", x=torch.randn(2, 3))
                yield run_request("missing", "nomodel", x=x)

    answers = {r.request_id: r async for r in running.inference.RunStream(requests())}
    assert set(answers) == {*xs, "bad", "nomodel"}
    assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "input 'x': dim 1 is 3, expected 16" in answers["bad"].error.message
    assert answers["nomodel"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    eager = demo_model()
    for rid, x in xs.items():
        assert answers[rid].WhichOneof("result") == "response"
        torch.testing.assert_close(outputs_of(answers[rid].response)["logits"], eager(x))


# ------------------------------------------------------------------ bad input
BAD_INPUTS = [
    ("unknown model", run_request("nope", x=torch.randn(1, 16)), grpc.StatusCode.NOT_FOUND, ["'nope'"]),
    (
        "dtype",
        run_request("demo", x=torch.randn(1, 16, dtype=torch.float64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x': dtype float64, expected float32"],
    ),
    (
        "rank",
        run_request("demo", x=torch.randn(16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x': rank 1", "expected rank 2"],
    ),
    (
        "dim",
        run_request("demo", x=torch.randn(2, 15)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x': dim 1 is 15, expected 16"],
    ),
    (
        "too many rows",
        run_request("demo", x=torch.randn(65, 16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["too many rows: 65", "at most 64"],
    ),
    (
        "zero rows",
        run_request("demo", x=torch.randn(0, 16)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input 'x': dim 0 is 0, expected 1..64"],
    ),
    (
        "missing input",
        run_request("two", features=torch.randn(1, 8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["missing input 'ids'"],
    ),
    (
        "extra input",
        run_request("demo", x=torch.randn(1, 16), y=torch.randn(1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["unknown input 'y'"],
    ),
    (
        "rows disagree",
        run_request("two", features=torch.randn(2, 8), ids=torch.zeros(3, 3, dtype=torch.int64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["disagree on the batch dimension", "features has 2, ids has 3"],
    ),
    (
        "unknown output",
        pb.RunRequest(
            model="demo",
            inputs={"x": tensors.tensor_to_pb(torch.randn(1, 16))},
            output_names=["nope"],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["unknown output 'nope'"],
    ),
    (
        "priority",
        pb.RunRequest(model="demo", inputs={"x": tensors.tensor_to_pb(torch.randn(1, 16))}, priority=7),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["priority 7 out of range"],
    ),
]


def _byte_length_request() -> pb.RunRequest:
    tensor = tensors.tensor_to_pb(torch.randn(2, 16))
    tensor.data = tensor.data[:-4]
    return pb.RunRequest(model="demo", inputs={"x": tensor})


def _unset_dtype_request() -> pb.RunRequest:
    tensor = tensors.tensor_to_pb(torch.randn(2, 16))
    tensor.dtype = pb.DTYPE_UNSPECIFIED
    return pb.RunRequest(model="demo", inputs={"x": tensor})


def _negative_dim_request() -> pb.RunRequest:
    return pb.RunRequest(model="demo", inputs={"x": pb.Tensor(dtype=pb.FLOAT32, shape=[-1, 16])})


BAD_INPUTS += [
    (
        "byte length",
        _byte_length_request(),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["inputs['x']: data has 124 bytes, shape [2, 16] of float32 needs 128"],
    ),
    (
        "dtype unset",
        _unset_dtype_request(),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["inputs['x']: dtype DTYPE_UNSPECIFIED"],
    ),
    (
        "negative dim",
        _negative_dim_request(),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["inputs['x']: negative dimension"],
    ),
]


@pytest.mark.parametrize(
    ("case", "request_", "code", "fragments"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
async def test_bad_input_gets_a_precise_status_and_the_server_keeps_serving(
    running: Running, case: str, request_: pb.RunRequest, code: grpc.StatusCode, fragments: list[str]
) -> None:
    await expect_error(running.inference.Run(request_), code, *fragments)
    x = torch.randn(1, 16)
    response = await running.inference.Run(run_request("demo", x=x))
    torch.testing.assert_close(outputs_of(response)["logits"], demo_model()(x))


# Holds a runner through the in-process scheduler: one process only.
@pytest.mark.layouts("one-process")
async def test_expired_deadline_is_never_executed(running: Running) -> None:
    """Dispatch is held (as during a constant swap), so the request can only wait in
    the queue; its 50 ms timeout passes there, it is answered DEADLINE_EXCEEDED, and
    it never runs, not even once the runners are free again."""
    scheduler = running.server.manager.get("demo").scheduler
    gate = threading.Event()
    hold = asyncio.ensure_future(scheduler.exclusive(lambda: gate.wait(30), bump_version=False))
    try:
        request = run_request("demo", x=torch.randn(1, 16))
        request.timeout_us = 50_000
        await expect_error(running.inference.Run(request), grpc.StatusCode.DEADLINE_EXCEEDED, "while queued")
        assert scheduler.queue_depth == 0
    finally:
        gate.set()
        await hold
    assert (await running.inference.Run(run_request("demo", x=torch.randn(1, 16)))).outputs
    assert scheduler.stats.requests == 1  # only the second request ran


# ------------------------------------------------------------------ loader RPCs
async def test_list_models(running: Running) -> None:
    listed = {m.name: m for m in (await running.loader.ListModels(pb.ListModelsRequest())).models}
    assert set(listed) == {"demo", "two", "vec"}
    demo = listed["demo"]
    assert demo.num_runners == 2 and list(demo.device_indices) == [-1]
    assert demo.schema.batched and demo.schema.source == "package"
    assert [i.name for i in demo.schema.inputs] == ["x"]
    assert demo.schema.inputs[0].dims[0].size == -1 and demo.schema.inputs[0].dims[1].size == 16
    assert demo.batching.max_batch_size == 64
    assert not listed["vec"].schema.batched and listed["vec"].batching.max_batch_size == 1


async def test_get_metadata_and_call_spec(running: Running) -> None:
    metadata = (await running.loader.GetMetadata(pb.GetMetadataRequest(name="two"))).metadata
    assert metadata["owner"] == "tests" and "pt2serve.schema" in metadata
    spec = await running.loader.GetCallSpec(pb.GetCallSpecRequest(name="two"))
    assert list(spec.input_names) == ["features", "ids"]
    assert list(spec.output_names) == ["mixed", "peak"]
    assert spec.in_spec.startswith("[1, ") and spec.out_spec.startswith("[1, ")
    await expect_error(running.loader.GetCallSpec(pb.GetCallSpecRequest(name="x")), grpc.StatusCode.NOT_FOUND)


async def test_load_metadata_from_package_without_loading(running: Running, packages: Packages) -> None:
    response = await running.loader.LoadMetadataFromPackage(
        pb.LoadMetadataFromPackageRequest(package_path=str(packages.two_input))
    )
    assert response.metadata["owner"] == "tests"
    # Relative paths resolve against the model root.
    relative = await running.loader.LoadMetadataFromPackage(
        pb.LoadMetadataFromPackageRequest(package_path=packages.two_input.name)
    )
    assert relative.metadata == response.metadata
    await expect_error(
        running.loader.LoadMetadataFromPackage(pb.LoadMetadataFromPackageRequest(package_path="nope.pt2")),
        grpc.StatusCode.NOT_FOUND,
        "no package file",
    )


async def test_get_constant_fqns(running: Running) -> None:
    constants = (await running.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name="demo"))).constants
    by_fqn = {c.fqn: c for c in constants}
    assert list(by_fqn["hidden.weight"].shape) == [32, 16]
    assert by_fqn["hidden.weight"].dtype == pb.FLOAT32
    assert by_fqn["hidden.weight"].internal_name


async def test_load_constants_and_update_constant_buffer(running: Running) -> None:
    eager = demo_model()
    with torch.no_grad():
        eager.hidden.weight.mul_(0.5)
        eager.out.weight.mul_(-1)
    listed = (await running.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name="demo"))).constants
    new = {c.fqn: eager.get_parameter(c.fqn).detach() for c in listed}
    x = torch.randn(3, 16)
    before = outputs_of(await running.inference.Run(run_request("demo", x=x)))["logits"]
    # Staged in the inactive buffer: not served, version unchanged.
    staged = await running.load_constants(
        pb.LoadConstantsRequest(
            name="demo", constants={k: tensors.tensor_to_pb(v) for k, v in new.items()}, use_inactive=True
        )
    )
    assert staged.constants_version == 0 and staged.updated == len(new) >= 2
    response = await running.inference.Run(run_request("demo", x=x))
    torch.testing.assert_close(outputs_of(response)["logits"], before)
    assert response.constants_version == 0

    served = await running.load_constants(
        pb.LoadConstantsRequest(
            name="demo",
            constants={k: tensors.tensor_to_pb(v) for k, v in new.items()},
            check_full_update=True,
        )
    )
    assert served.constants_version == 1
    response = await running.inference.Run(run_request("demo", x=x))
    torch.testing.assert_close(outputs_of(response)["logits"], eager(x))
    assert response.constants_version == 1

    constants = (await running.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name="demo"))).constants
    internal = {c.fqn: c.internal_name for c in constants}
    with torch.no_grad():
        eager.out.weight.zero_()
    updated = await running.loader.UpdateConstantBuffer(
        pb.UpdateConstantBufferRequest(
            name="demo",
            constants={internal["out.weight"]: tensors.tensor_to_pb(torch.zeros(4, 32))},
            user_managed=True,
        )
    )
    assert updated.constants_version == 2
    response = await running.inference.Run(run_request("demo", x=x))
    torch.testing.assert_close(outputs_of(response)["logits"], eager(x))


async def test_bad_constant_updates_change_nothing(running: Running) -> None:
    x = torch.randn(2, 16)
    before = outputs_of(await running.inference.Run(run_request("demo", x=x)))["logits"]
    cases = [
        ({"hidden.weight": torch.zeros(32, 16, dtype=torch.float64)}, "dtype float64, expected float32"),
        ({"hidden.weight": torch.zeros(16, 32)}, "shape [16, 32], expected [32, 16]"),
        ({"nope": torch.zeros(1)}, "unknown constant 'nope'"),
    ]
    for constants, fragment in cases:
        request = pb.LoadConstantsRequest(
            name="demo", constants={k: tensors.tensor_to_pb(v) for k, v in constants.items()}
        )
        await expect_error(running.load_constants(request), grpc.StatusCode.INVALID_ARGUMENT, fragment)
    after = await running.inference.Run(run_request("demo", x=x))
    torch.testing.assert_close(outputs_of(after)["logits"], before)
    assert after.constants_version == 0


async def test_load_and_unload_models(running: Running, packages: Packages) -> None:
    request = pb.LoadModelRequest(
        name="foreign",
        package_path=str(packages.foreign),
        run_single_threaded=True,
        batching=pb.BatchingConfig(max_batch_size=8, max_queue_size=16),
    )
    status = (await running.loader.LoadModel(request)).model
    assert status.schema.source == "derived" and status.num_runners == 1
    assert status.batching.max_batch_size == 8 and status.batching.max_queue_size == 16
    await expect_error(running.loader.LoadModel(request), grpc.StatusCode.ALREADY_EXISTS, "'foreign'")
    example = models.two_input_example(3)
    response = await running.inference.Run(
        run_request("foreign", input0=example["features"], input1=example["ids"])
    )
    torch.testing.assert_close(outputs_of(response)["output0"], models.make_two_input()(**example)[0])

    health = health_pb2_grpc.HealthStub(running.channel)
    check = await health.Check(health_pb2.HealthCheckRequest(service="foreign"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING

    await running.loader.UnloadModel(pb.UnloadModelRequest(name="foreign"))
    await expect_error(
        running.inference.Run(run_request("foreign", input0=example["features"])), grpc.StatusCode.NOT_FOUND
    )
    check = await health.Check(health_pb2.HealthCheckRequest(service="foreign"))
    assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await expect_error(
        running.loader.UnloadModel(pb.UnloadModelRequest(name="foreign")), grpc.StatusCode.NOT_FOUND
    )


async def test_load_model_errors(running: Running, packages: Packages) -> None:
    await expect_error(
        running.loader.LoadModel(pb.LoadModelRequest(name="m", package_path="missing.pt2")),
        grpc.StatusCode.NOT_FOUND,
        "no package file",
    )
    await expect_error(
        running.loader.LoadModel(
            pb.LoadModelRequest(
                name="st", package_path=str(packages.demo), run_single_threaded=True, num_runners=2
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "num_runners must be 1, got 2",
    )
    await expect_error(
        running.loader.LoadModel(pb.LoadModelRequest(name="", package_path=str(packages.demo))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model name must not be empty",
    )
    await expect_error(
        running.loader.LoadModel(
            pb.LoadModelRequest(
                name="big",
                package_path=str(packages.two_input),
                batching=pb.BatchingConfig(max_batch_size=64),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "exceeds the package's bound of 32",
    )
    assert {m.name for m in (await running.loader.ListModels(pb.ListModelsRequest())).models} == {
        "demo",
        "two",
        "vec",
    }


async def test_user_schema_overrides_derived_names(running: Running, packages: Packages) -> None:
    schema = pb.ModelSchema(
        batched=True,
        inputs=[
            pb.TensorSpec(
                name="features",
                dtype=pb.FLOAT32,
                dims=[pb.DimSpec(size=-1, min=1, max=16), pb.DimSpec(size=8)],
            ),
            pb.TensorSpec(
                name="ids", dtype=pb.INT64, dims=[pb.DimSpec(size=-1, min=1, max=16), pb.DimSpec(size=3)]
            ),
        ],
        outputs=[pb.TensorSpec(name="mixed"), pb.TensorSpec(name="peak")],
    )
    await running.loader.LoadModel(
        pb.LoadModelRequest(name="named", package_path=str(packages.foreign), schema=schema)
    )
    example = models.two_input_example(2)
    got = outputs_of(await running.inference.Run(run_request("named", **example)))
    torch.testing.assert_close(got["peak"], models.make_two_input()(**example)[1])


# ------------------------------------------------------------ health, reflection
def test_only_the_unary_inference_methods_are_registered_with_the_core() -> None:
    # grpc.aio waits on one future per registered method for every call it accepts;
    # a misspelt name in REGISTERED would silently register nothing.
    class Recorder:
        def __init__(self) -> None:
            self.generic: list[Any] = []
            self.registered: dict[str, Any] = {}

        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.generic.extend(handlers)

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            self.registered.update({f"/{service}/{name}": h for name, h in handlers.items()})

    recorder = Recorder()
    policy = CallPolicy(GrpcMetrics(CollectorRegistry()), None, CallsInFlight())
    pb_grpc.add_InferenceServicer_to_server(pb_grpc.InferenceServicer(), Registrar(recorder, policy))  # type: ignore[no-untyped-call, arg-type]
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        v2_grpc.GRPCInferenceServiceServicer(),
        Registrar(recorder, policy),  # type: ignore[arg-type]
    )
    assert set(recorder.registered) == REGISTERED
    # Every method, registered or not, is still found by name.
    methods = ("/pt2serve.v1.Inference/RunStream", "/inference.GRPCInferenceService/ServerLive", *REGISTERED)
    for method in methods:
        details = SimpleNamespace(method=method, invocation_metadata=())
        assert any(h.service(details) is not None for h in recorder.generic), method


async def test_health_and_reflection(running: Running) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", "demo", "pt2serve.v1.Inference", "pt2serve.v1.ModelLoader"):
        check = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert check.status == health_pb2.HealthCheckResponse.SERVING, service
    await expect_error(health.Check(health_pb2.HealthCheckRequest(service="nope")), grpc.StatusCode.NOT_FOUND)
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    services = set()
    async for reply in stub.ServerReflectionInfo(ask()):
        services = {s.name for s in reply.list_services_response.service}
    assert {"pt2serve.v1.Inference", "pt2serve.v1.ModelLoader", "grpc.health.v1.Health"} <= services


async def test_large_tensor_fits_default_message_size(running: Running) -> None:
    # 64 rows x 16 floats is small; the limit matters for large inputs: 8 MB here,
    # twice gRPC's 4 MB default, must pass.
    blob = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 1024, 1024], data=bytes(8 * 1024 * 1024))
    await expect_error(
        running.inference.Run(pb.RunRequest(model="demo", inputs={"x": blob})),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'x': rank 3",
    )


async def test_stage_then_swap_constants(running: Running) -> None:
    listed = (await running.loader.GetConstantFqns(pb.GetConstantFqnsRequest(name="demo"))).constants
    eager = demo_model()
    with torch.no_grad():
        for c in listed:
            eager.get_parameter(c.fqn).add_(0.25)
    staged = await running.load_constants(
        pb.LoadConstantsRequest(
            name="demo",
            constants={c.fqn: tensors.tensor_to_pb(eager.get_parameter(c.fqn).detach()) for c in listed},
            use_inactive=True,
        )
    )
    assert staged.constants_version == 0
    x = torch.randn(2, 16)
    swapped = await running.loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name="demo"))
    assert swapped.constants_version == 1
    response = await running.inference.Run(run_request("demo", x=x))
    assert response.constants_version == 1
    torch.testing.assert_close(outputs_of(response)["logits"], eager(x))
    await expect_error(
        running.loader.SwapConstantBuffer(pb.SwapConstantBufferRequest(name="demo")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "were not staged",
    )
    status = (await running.loader.ListModels(pb.ListModelsRequest())).models[0]
    assert status.name == "demo" and status.constants_version == 1 and status.runtime == "native"


async def test_ordered_stream_answers_in_request_order(running: Running) -> None:
    # Mixed sizes finish out of order when batched; the ordered stream holds answers back.
    xs = [torch.randn(1 + (7 * i) % 5, 16) for i in range(30)]

    async def requests() -> AsyncIterator[pb.RunRequest]:
        for i, x in enumerate(xs):
            yield run_request("demo", f"r{i}", x=x)
            if i == 10:
                yield run_request("demo", "bad", x=torch.randn(1, 2))

    call = running.inference.RunStream(requests(), metadata=(("pt2serve-ordered", "true"),))
    ids = [r.request_id async for r in call]
    assert ids == [f"r{i}" for i in range(11)] + ["bad"] + [f"r{i}" for i in range(11, 30)]


# Reads each binding's batches in process: one process only.
@pytest.mark.layouts("one-process")
async def test_a_model_bound_twice_spreads_batches_and_updates_both(
    running: Running, packages: Packages
) -> None:
    """Two device bindings (both the CPU here): batches go to both, and a constant
    update reaches both or neither."""
    status = (
        await running.loader.LoadModel(
            pb.LoadModelRequest(name="pair", package_path=str(packages.demo), device_indices=[-1, -1])
        )
    ).model
    assert list(status.device_indices) == [-1, -1]
    model = running.server.manager.get("pair")
    assert len(model.bindings) == 2
    eager = demo_model()
    slots = model.scheduler.slots
    for _ in range(20):  # bursts until both bindings have run batches
        xs = [torch.randn(1 + i % 2, 16) for i in range(40)]
        responses = await asyncio.gather(*(running.inference.Run(run_request("pair", x=x)) for x in xs))
        for x, response in zip(xs, responses, strict=True):
            torch.testing.assert_close(outputs_of(response)["logits"], eager(x))
        if all(slot.batches for slot in slots):
            break
    assert all(slot.batches for slot in slots), [slot.batches for slot in slots]
    assert sum(slot.batches for slot in slots) == model.scheduler.stats.batches
    weight = torch.zeros(32, 16)
    await running.load_constants(
        pb.LoadConstantsRequest(name="pair", constants={"hidden.weight": tensors.tensor_to_pb(weight)})
    )
    with torch.no_grad():
        eager.hidden.weight.zero_()
    x = torch.randn(1, 16)
    for binding in model.bindings:
        torch.testing.assert_close(binding.run([x.clone()])[0], eager(x))
