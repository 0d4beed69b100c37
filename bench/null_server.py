"""The wall: a gRPC server of the same stack as pt2serve that does no model work.

It decodes each request's tensors as pt2serve's front ends do (bytes checked against
the declared dtype and shape, no torch tensor made) and answers with zeros of the
model's output shape, with the same per-method wrapper (service/calls.py) and
message-size options, so the difference to pt2serve is the scheduler and the model.
It serves pt2serve.v1 `Run`/`RunStream` and KServe `ModelInfer`.

On SIGTERM it does what a plain grpc.aio server does (grpc's graceful-shutdown
example): health NOT_SERVING, then `server.stop(grace)`: bench.drain's baseline.

    python -m bench.null_server --port 0 --output-width 4
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from prometheus_client import CollectorRegistry

from pt2serve.loader.dtypes import RawTensor
from pt2serve.service import tensors
from pt2serve.service.calls import CallPolicy, Registrar
from pt2serve.service.cli import tune_process
from pt2serve.service.config import ServerConfig
from pt2serve.service.errors import CallsInFlight
from pt2serve.service.metrics import GrpcMetrics
from pt2serve.service.pb import grpc_service_pb2 as v2
from pt2serve.service.pb import grpc_service_pb2_grpc as v2_grpc
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.tensors import DEFAULT_MAX_MESSAGE_BYTES


class NullInference(pb_grpc.InferenceServicer):
    def __init__(self, output_width: int) -> None:
        self.width = output_width

    def _answer(self, request: pb.RunRequest) -> pb.RunResponse:
        # Decoded and answered as pt2serve's front ends do (checked bytes, no torch).
        inputs = tensors.raw_tensors_from_pb(request.inputs, "inputs")
        rows = next(iter(inputs.values())).shape[0] if inputs else 1
        zeros = RawTensor(torch.float32, (rows, self.width), bytes(4 * rows * self.width))
        output = tensors.tensor_to_pb(zeros)
        return pb.RunResponse(model=request.model, request_id=request.request_id, outputs={"output": output})

    async def Run(self, request: pb.RunRequest, context: Any) -> pb.RunResponse:
        return self._answer(request)

    async def RunStream(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: Any
    ) -> AsyncIterator[pb.RunStreamResponse]:
        async for request in request_iterator:
            yield pb.RunStreamResponse(request_id=request.request_id, response=self._answer(request))


class NullKServe(v2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer: float32 zeros of [rows, width] for output "output", rows from the
    first input's shape."""

    def __init__(self, output_width: int) -> None:
        self._width = output_width

    async def ModelInfer(self, request: v2.ModelInferRequest, context: Any) -> v2.ModelInferResponse:
        rows = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
        response = v2.ModelInferResponse(model_name=request.model_name, id=request.id)
        response.outputs.add(name="output", datatype="FP32", shape=[rows, self._width])
        response.raw_output_contents.append(bytes(4 * rows * self._width))
        return response


GRACE_S = 10.0


async def serve(port: int, servicer: NullInference) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ],
    )
    registrar: Any = Registrar(server, CallPolicy(GrpcMetrics(CollectorRegistry()), None, CallsInFlight()))
    pb_grpc.add_InferenceServicer_to_server(servicer, registrar)  # type: ignore[no-untyped-call]
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(NullKServe(servicer.width), registrar)  # type: ignore[no-untyped-call]
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    defaults = ServerConfig()
    tune_process(defaults.gil_switch_interval_us, defaults.gc_gen0_threshold)  # as `pt2serve serve`
    print(f"null server listening on 127.0.0.1:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(GRACE_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--output-width", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, NullInference(args.output_width)))


if __name__ == "__main__":
    main()
