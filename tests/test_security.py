"""Hardening: management auth, TLS and mutual TLS, path confinement, limits, and
clients that vanish mid-stream."""

from __future__ import annotations

import asyncio
import pathlib
import threading
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from pt2serve.scheduler.manager import ModelConfig
from pt2serve.service import tensors
from pt2serve.service.client import Pt2ServeClient
from pt2serve.service.config import ServerConfig
from pt2serve.service.demo import demo_model
from pt2serve.service.pb import grpc_service_pb2 as v2
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.security import MANAGEMENT_METHODS
from tests.conftest import CACHE, Packages, Running, serving
from tests.test_service import expect_error, outputs_of, run_request
from tests.tls_certs import make_certs

TOKEN = "s3cret-token"


def config_for(packages: Packages, **fields: object) -> ServerConfig:
    return ServerConfig(
        grpc_port=0,
        metrics_port=0,
        model_root=str(CACHE),
        models=(ModelConfig("demo", str(packages.demo)),),
        **fields,  # type: ignore[arg-type]
    )


def test_every_model_loader_rpc_that_changes_or_reads_by_path_needs_the_token() -> None:
    """Derived from the proto, so a new ModelLoader RPC is guarded unless it is named
    here as read-only."""
    read_only = {"ListModels", "GetMetadata", "GetCallSpec", "GetConstantFqns"}
    service = pb.DESCRIPTOR.services_by_name["ModelLoader"]
    guarded = {f"/{service.full_name}/{m.name}" for m in service.methods if m.name not in read_only}
    assert "/pt2serve.v1.ModelLoader/DiscardStagedConstants" in guarded
    assert guarded <= MANAGEMENT_METHODS


def demo_only(packages: Packages) -> tuple[ModelConfig, ...]:
    return (ModelConfig("demo", str(packages.demo)),)


async def test_management_calls_need_the_token(
    packages: Packages, tmp_path: pathlib.Path, layout: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    async with (
        serving(layout, tmp_path / "server", demo_only(packages), management_token_file=token_file) as served,
        grpc.aio.insecure_channel(served.target) as channel,
    ):
        loader = pb_grpc.ModelLoaderStub(channel)
        inference = pb_grpc.InferenceStub(channel)
        load = pb.LoadModelRequest(name="two", package_path=str(packages.two_input))
        await expect_error(
            loader.LoadModel(load), grpc.StatusCode.UNAUTHENTICATED, "needs the management token"
        )
        wrong = (("authorization", "Bearer nope"),)
        await expect_error(loader.LoadModel(load, metadata=wrong), grpc.StatusCode.UNAUTHENTICATED)
        weights = pb.LoadConstantsRequest(
            name="demo", constants={"hidden.weight": tensors.tensor_to_pb(torch.zeros(32, 16))}
        )
        await expect_error(loader.LoadConstants(iter([weights])), grpc.StatusCode.UNAUTHENTICATED)
        unload = channel.unary_unary(
            "/inference.GRPCInferenceService/RepositoryModelUnload",
            request_serializer=v2.RepositoryModelUnloadRequest.SerializeToString,
            response_deserializer=v2.RepositoryModelUnloadResponse.FromString,
        )
        await expect_error(
            unload(v2.RepositoryModelUnloadRequest(model_name="demo")), grpc.StatusCode.UNAUTHENTICATED
        )
        # Inference and read-only inspection stay open.
        x = torch.randn(2, 16)
        response = await inference.Run(run_request("demo", x=x))
        torch.testing.assert_close(outputs_of(response)["logits"], demo_model()(x))
        assert len((await loader.ListModels(pb.ListModelsRequest())).models) == 1
        good = (("authorization", f"Bearer {TOKEN}"),)
        status = (await loader.LoadModel(load, metadata=good)).model
        assert status.name == "two"
        assert (
            await served.metric(
                "grpc_server_handled_total",
                {
                    "grpc_type": "unary",
                    "grpc_service": "pt2serve.v1.ModelLoader",
                    "grpc_method": "LoadModel",
                    "grpc_code": "UNAUTHENTICATED",
                },
            )
            == 2
        )

        # The Python client and CLI send the token as call credentials.
        def with_client() -> str:
            with Pt2ServeClient(served.target, token=TOKEN) as client:
                client.unload_model("two")
                return client.list_models()[0].name

        assert await asyncio.to_thread(with_client) == "demo"


async def test_tls_and_mutual_tls(packages: Packages, tmp_path: pathlib.Path, layout: str) -> None:
    certs = make_certs(tmp_path)
    x = torch.randn(1, 16)
    keys = {"tls_cert_file": certs.server_cert, "tls_key_file": certs.server_key}
    async with serving(layout, tmp_path / "tls", demo_only(packages), **keys) as tls:
        target = tls.target

        def infer(**options: object) -> torch.Tensor:
            with Pt2ServeClient(target, **options) as client:  # type: ignore[arg-type]
                return client.infer("demo", {"x": x}, timeout_s=10)["logits"]

        torch.testing.assert_close(
            await asyncio.to_thread(infer, tls=True, ca_file=str(certs.ca)), demo_model()(x)
        )
        with pytest.raises(grpc.RpcError) as info:
            await asyncio.to_thread(infer)  # plain text against TLS
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        with pytest.raises(grpc.RpcError):
            await asyncio.to_thread(infer, tls=True, ca_file=str(certs.other_ca))  # untrusted server

    keys["tls_client_ca_file"] = certs.ca
    async with serving(layout, tmp_path / "mtls", demo_only(packages), **keys) as mutual:
        target = mutual.target

        def infer_mutual(**options: object) -> torch.Tensor:
            with Pt2ServeClient(target, tls=True, ca_file=str(certs.ca), **options) as client:  # type: ignore[arg-type]
                return client.infer("demo", {"x": x}, timeout_s=10)["logits"]

        got = await asyncio.to_thread(
            infer_mutual, cert_file=str(certs.client_cert), key_file=str(certs.client_key)
        )
        torch.testing.assert_close(got, demo_model()(x))
        with pytest.raises(grpc.RpcError):
            await asyncio.to_thread(infer_mutual)  # no client certificate


def test_tls_settings_must_be_complete(packages: Packages) -> None:
    from pt2serve.loader.errors import InvalidInput

    with pytest.raises(InvalidInput, match="go together"):
        config_for(packages, tls_cert_file="a.pem")
    with pytest.raises(InvalidInput, match="mutual TLS"):
        config_for(packages, tls_client_ca_file="ca.pem")


async def test_package_paths_are_confined_to_the_model_root(running: Running, tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "evil.pt2"
    outside.write_bytes(b"not a package")
    link = CACHE / f"link-{tmp_path.name}.pt2"
    link.symlink_to(outside)
    try:
        for path in (str(outside), "../../../../" + str(outside).lstrip("/"), link.name):
            await expect_error(
                running.loader.LoadModel(pb.LoadModelRequest(name="evil", package_path=path)),
                grpc.StatusCode.PERMISSION_DENIED,
                "outside the server's model root",
            )
            await expect_error(
                running.loader.LoadMetadataFromPackage(pb.LoadMetadataFromPackageRequest(package_path=path)),
                grpc.StatusCode.PERMISSION_DENIED,
            )
    finally:
        link.unlink()


async def test_tensor_and_chunk_limits(packages: Packages, tmp_path: pathlib.Path, layout: str) -> None:
    limit = 1024 / (1 << 20)  # 1,024 bytes
    async with (
        serving(layout, tmp_path / "server", demo_only(packages), max_tensor_mb=limit) as served,
        grpc.aio.insecure_channel(served.target) as channel,
    ):
        inference = pb_grpc.InferenceStub(channel)
        loader = pb_grpc.ModelLoaderStub(channel)
        await expect_error(
            inference.Run(run_request("demo", x=torch.randn(17, 16))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs['x']: shape [17, 16] spans 1088 bytes, over the server's limit of 1024",
        )
        # A chunk header declaring a huge constant is refused before any allocation.
        huge = pb.LoadConstantsRequest(name="demo", use_inactive=True)
        huge.chunks.append(
            pb.TensorChunk(fqn="hidden.weight", dtype=pb.FLOAT32, shape=[1 << 20, 1 << 20], data=b"\0")
        )
        await expect_error(
            loader.LoadConstants(iter([huge])),
            grpc.StatusCode.INVALID_ARGUMENT,
            "over the server's limit",
        )
        response = await inference.Run(run_request("demo", x=torch.randn(2, 16)))
        assert outputs_of(response)["logits"].shape == (2, 4)


# Holds a runner through the in-process scheduler: one process only.
@pytest.mark.layouts("one-process")
async def test_a_vanished_stream_client_leaves_no_queued_work(running: Running) -> None:
    scheduler = running.server.manager.get("demo").scheduler
    gate = threading.Event()
    hold = asyncio.ensure_future(scheduler.exclusive(lambda: gate.wait(30), bump_version=False))
    try:

        async def requests() -> AsyncIterator[pb.RunRequest]:
            for i in range(20):
                yield run_request("demo", f"r{i}", x=torch.randn(1, 16))
            await asyncio.Event().wait()  # keep the stream open, like a live client

        call = running.inference.RunStream(requests())
        reader = asyncio.ensure_future(call.read())
        for _ in range(500):
            if scheduler.queue_depth == 20:
                break
            await asyncio.sleep(0.01)
        assert scheduler.queue_depth == 20
        call.cancel()
        for _ in range(500):
            if scheduler.queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        assert scheduler.queue_depth == 0
        reader.cancel()
    finally:
        gate.set()
        await hold
    assert scheduler.stats.requests == 0  # none of them ever ran
    cancelled = running.server.registry.get_sample_value(
        "pt2serve_inference_cancelled_requests_total", {"model": "demo"}
    )
    assert cancelled == 20
