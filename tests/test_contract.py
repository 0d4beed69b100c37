"""The contract as clients meet it: code generated from protos/ alone, server
reflection, the protos' language options, health that follows every way of loading
a model, reloads that keep the old model on failure, warm-up, and quiet cancels."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import re
import sys
import textwrap
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pt2serve.service.demo import demo_model
from pt2serve.service.pb import grpc_service_pb2 as v2
from pt2serve.service.pb import grpc_service_pb2_grpc as v2_grpc
from pt2serve.service.pb import pt2serve_pb2 as pb
from tests import models
from tests.conftest import CACHE, Packages, Running
from tests.test_service import expect_error, run_request

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = sorted((ROOT / "protos").rglob("*.proto"))


def protoc(*args: str) -> None:
    from grpc_tools import protoc as tool

    include = pathlib.Path(tool.__file__).parent / "_proto"
    code = tool.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", *args, *map(str, PROTOS)])
    assert code == 0, args


# ------------------------------------------------------------ protos alone
def test_protos_carry_the_usual_language_options(tmp_path: pathlib.Path) -> None:
    """protoc compiles both files, and each names its Go, Java and C# packages, so
    `protoc --go_out` (and the others) work without extra flags."""
    protoc(f"--python_out={tmp_path}", f"--descriptor_set_out={tmp_path / 'set.pb'}")
    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "set.pb").read_bytes()).file
    assert {f.package for f in files} == {"pt2serve.v1", "inference"}
    for file in files:
        options = file.options
        assert options.go_package and options.java_package and options.csharp_namespace, file.name
        assert options.java_multiple_files, file.name
    assert (tmp_path / "pt2serve" / "kserve" / "v2" / "grpc_service_pb2.py").exists()


async def test_a_client_generated_from_the_protos_calls_both_services(
    running: Running, tmp_path: pathlib.Path
) -> None:
    protoc(f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}")
    x = torch.randn(2, 16)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import grpc
        from pt2serve.v1 import pt2serve_pb2 as pb, pt2serve_pb2_grpc as pb_grpc
        from pt2serve.kserve.v2 import grpc_service_pb2 as v2, grpc_service_pb2_grpc as v2_grpc
        data = bytes.fromhex({x.numpy().tobytes().hex()!r})
        with grpc.insecure_channel({running.target!r}) as channel:
            tensor = pb.Tensor(dtype=pb.FLOAT32, shape=[2, 16], data=data)
            run = pb_grpc.InferenceStub(channel).Run(pb.RunRequest(model="demo", inputs={{"x": tensor}}))
            request = v2.ModelInferRequest(model_name="demo", raw_input_contents=[data])
            request.inputs.add(name="x", datatype="FP32", shape=[2, 16])
            infer = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        print(run.outputs["logits"].data.hex())
        print(infer.raw_output_contents[0].hex())
        """
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    want = demo_model()(x)
    for line in out.decode().split():
        got = torch.frombuffer(bytearray(bytes.fromhex(line)), dtype=torch.float32).reshape(2, 4)
        torch.testing.assert_close(got, want)


# -------------------------------------------------------------- reflection
def _reflect_and_call(target: str, x: torch.Tensor) -> dict[str, Any]:
    """Describe every listed service from reflection alone, then call one method of
    each with messages built from the reflected descriptors."""
    calls = {
        "pt2serve.v1.ModelLoader": ("ListModels", {}),
        "pt2serve.v1.Inference": (
            "Run",
            {"model": "demo", "inputs": {"x": {"dtype": 1, "shape": [2, 16], "data": x.numpy().tobytes()}}},
        ),
        "inference.GRPCInferenceService": ("ModelMetadata", {"name": "two"}),
        "grpc.health.v1.Health": ("Check", {"service": "demo"}),
    }
    answers: dict[str, Any] = {}
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        services = list(database.get_services())
        for service_name in services:
            service = pool.FindServiceByName(service_name)
            assert service.methods, service_name
            if service_name not in calls:
                continue
            method_name, fields = calls[service_name]
            method = service.methods_by_name[method_name]
            request = message_factory.GetMessageClass(method.input_type)(**fields)
            response_cls = message_factory.GetMessageClass(method.output_type)
            call = channel.unary_unary(
                f"/{service_name}/{method_name}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_cls.FromString,
            )
            answers[service_name] = call(request, timeout=30)
    answers["services"] = services
    return answers


async def test_reflection_describes_and_calls_every_service(running: Running) -> None:
    x = torch.randn(2, 16)
    answers = await asyncio.to_thread(_reflect_and_call, running.target, x)
    assert set(answers["services"]) == {
        "pt2serve.v1.ModelLoader",
        "pt2serve.v1.Inference",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert {m.name for m in answers["pt2serve.v1.ModelLoader"].models} == {"demo", "two", "vec"}
    logits = answers["pt2serve.v1.Inference"].outputs["logits"]
    got = torch.frombuffer(bytearray(logits.data), dtype=torch.float32).reshape(2, 4)
    torch.testing.assert_close(got, demo_model()(x))
    assert [o.name for o in answers["inference.GRPCInferenceService"].outputs] == ["mixed", "peak"]
    assert answers["grpc.health.v1.Health"].status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------ health and reloads
async def health_of(running: Running, name: str) -> int:
    response = await health_pb2_grpc.HealthStub(running.channel).Check(
        health_pb2.HealthCheckRequest(service=name)
    )
    return int(response.status)


async def test_kserve_loads_and_unloads_update_health(running: Running) -> None:
    kserve = v2_grpc.GRPCInferenceServiceStub(running.channel)
    assert await health_of(running, "two") == health_pb2.HealthCheckResponse.SERVING
    await kserve.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="two"))
    assert await health_of(running, "two") == health_pb2.HealthCheckResponse.NOT_SERVING
    await kserve.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="two"))
    assert await health_of(running, "two") == health_pb2.HealthCheckResponse.SERVING
    ready = await kserve.ModelReady(v2.ModelReadyRequest(name="two"))
    assert ready.ready


async def test_health_watch_streams_each_change(running: Running) -> None:
    """Health.Watch (what balancing clients with healthCheckConfig open) sends the
    current status, then every change: here, an unload and a load of the model."""
    kserve = v2_grpc.GRPCInferenceServiceStub(running.channel)
    watch = health_pb2_grpc.HealthStub(running.channel).Watch(health_pb2.HealthCheckRequest(service="two"))
    statuses = watch.__aiter__()
    assert (await statuses.__anext__()).status == health_pb2.HealthCheckResponse.SERVING
    await kserve.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="two"))
    assert (await statuses.__anext__()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await kserve.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="two"))
    assert (await statuses.__anext__()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


async def test_a_failed_reload_keeps_the_old_model(running: Running) -> None:
    kserve = v2_grpc.GRPCInferenceServiceStub(running.channel)
    broken = CACHE / "broken-for-reload.pt2"
    broken.write_bytes(b"not a zip archive")
    # In one process the model object itself can be compared; every layout checks
    # that the old model goes on serving.
    old = running.server.manager.get("demo") if running.server else None
    request = v2.RepositoryModelLoadRequest(model_name="demo")
    request.parameters["package_path"].string_param = broken.name
    try:
        await expect_error(
            kserve.RepositoryModelLoad(request), grpc.StatusCode.FAILED_PRECONDITION, "cannot read metadata"
        )
    finally:
        broken.unlink()
    if running.server:
        assert running.server.manager.get("demo") is old
    assert await health_of(running, "demo") == health_pb2.HealthCheckResponse.SERVING
    x = torch.randn(1, 16)
    response = await running.inference.Run(run_request("demo", x=x))
    assert response.outputs["logits"].shape == [1, 4]


async def test_a_reload_switches_without_failing_requests_in_flight(running: Running) -> None:
    kserve = v2_grpc.GRPCInferenceServiceStub(running.channel)
    loads = {"model": "demo", "outcome": "success"}
    before = await running.metric("pt2serve_model_loads_total", loads)
    xs = [torch.randn(1, 16) for _ in range(40)]
    calls = [running.inference.Run(run_request("demo", x=x)) for x in xs[:20]]
    reload = kserve.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="demo"))
    calls += [running.inference.Run(run_request("demo", x=x)) for x in xs[20:]]
    responses = await asyncio.gather(*calls)
    await reload
    assert await running.metric("pt2serve_model_loads_total", loads) == (before or 0) + 1
    eager = demo_model()
    for x, response in zip(xs, responses, strict=True):
        got = torch.frombuffer(bytearray(response.outputs["logits"].data), dtype=torch.float32).reshape(1, 4)
        torch.testing.assert_close(got, eager(x))


# ----------------------------------------------------------------- warm-up
@pytest.mark.parametrize("warmup", [True, False])
async def test_warm_up_fills_in_outputs_of_foreign_packages(
    running: Running, packages: Packages, warmup: bool
) -> None:
    """A package built without pt2serve does not describe its outputs; one warm-up
    batch at load does, and KServe metadata then has their dtypes and shapes."""
    await running.loader.LoadModel(
        pb.LoadModelRequest(name="foreign", package_path=str(packages.foreign), skip_warmup=not warmup)
    )
    kserve = v2_grpc.GRPCInferenceServiceStub(running.channel)
    metadata = await kserve.ModelMetadata(v2.ModelMetadataRequest(name="foreign"))
    outputs = {o.name: (o.datatype, list(o.shape)) for o in metadata.outputs}
    config = (await kserve.ModelConfig(v2.ModelConfigRequest(name="foreign"))).config
    dims = {o.name: list(o.dims) for o in config.output}
    if warmup:
        assert outputs == {"output0": ("FP32", [-1, 5]), "output1": ("FP32", [-1])}
        assert dims == {"output0": [5], "output1": []}
    else:
        assert outputs == {"output0": ("", [-1]), "output1": ("", [-1])}
    # Either way the model serves, and the warm-up run is not counted as a request.
    example = models.two_input_example(3)
    response = await running.inference.Run(
        run_request("foreign", input0=example["features"], input1=example["ids"])
    )
    assert list(response.outputs["output0"].shape) == [3, 5]
    counted = await running.metric("pt2serve_inference_requests_total", {"model": "foreign", "code": "OK"})
    assert counted == 1


# -------------------------------------------------------- quiet cancels
async def test_cancelled_streams_leave_no_error_in_the_log(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    kserve = v2_grpc.GRPCInferenceServiceStub(running.channel)
    x = torch.randn(1, 16).numpy().tobytes()

    async def native() -> Any:
        for i in range(10_000):
            yield run_request("demo", str(i), x=torch.randn(2, 16))
            await asyncio.sleep(0)

    async def triton_style() -> Any:
        for i in range(10_000):
            request = v2.ModelInferRequest(model_name="demo", id=str(i), raw_input_contents=[x])
            request.inputs.add(name="x", datatype="FP32", shape=[1, 16])
            yield request
            await asyncio.sleep(0)

    for round_ in range(6):
        for call in (running.inference.RunStream(native()), kserve.ModelStreamInfer(triton_style())):
            seen = 0
            async for _ in call:
                seen += 1
                if seen == 10 + 7 * round_:
                    call.cancel()
                    break
    # Every stream's requests are withdrawn or answered, and the server still serves.
    response = await running.inference.Run(run_request("demo", x=torch.randn(1, 16)))
    assert response.outputs["logits"].shape == [1, 4]
    await asyncio.sleep(0)
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if running.log is not None:  # the front ends' and the engine's own log
        noisy += [
            line for line in running.log.read_text().splitlines() if not re.search(r" (INFO|DEBUG) ", line)
        ]
    assert not noisy, noisy[:10]


# ------------------------------------------------------------ long values
async def test_a_huge_model_name_is_not_found_with_a_short_message(running: Running) -> None:
    """The error used to echo the whole name, and its trailer outgrew what the client
    accepts: the client saw RESOURCE_EXHAUSTED instead of NOT_FOUND."""
    name = "m" * 200_000
    kserve = v2_grpc.GRPCInferenceServiceStub(running.channel)
    calls = [
        running.inference.Run(run_request(name, x=torch.randn(1, 16))),
        kserve.ModelInfer(v2.ModelInferRequest(model_name=name)),
        running.loader.GetMetadata(pb.GetMetadataRequest(name=name)),
    ]
    for call in calls:
        details = await expect_error(call, grpc.StatusCode.NOT_FOUND, "is not loaded", "(200000 characters)")
        assert len(details) < 400, len(details)
