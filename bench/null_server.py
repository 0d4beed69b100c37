"""The wall: a gRPC server of the same stack as pt2serve that does no model work.

It decodes each request's tensors as pt2serve's front ends do (bytes checked against
the declared dtype and shape, no torch tensor made) and answers with zeros of the
model's output shape, with the same per-method wrapper (service/calls.py) and
message-size options, so the difference to pt2serve is the scheduler and the model.

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
from prometheus_client import CollectorRegistry

from pt2serve.loader.dtypes import RawTensor
from pt2serve.service import tensors
from pt2serve.service.calls import CallPolicy, Registrar
from pt2serve.service.cli import tune_process
from pt2serve.service.config import ServerConfig
from pt2serve.service.errors import CallsInFlight
from pt2serve.service.metrics import GrpcMetrics
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.tensors import DEFAULT_MAX_MESSAGE_BYTES


class NullInference(pb_grpc.InferenceServicer):
    def __init__(self, output_width: int) -> None:
        self._width = output_width

    def _answer(self, request: pb.RunRequest) -> pb.RunResponse:
        # Decoded and answered as pt2serve's front ends do (checked bytes, no torch).
        inputs = tensors.raw_tensors_from_pb(request.inputs, "inputs")
        rows = next(iter(inputs.values())).shape[0] if inputs else 1
        zeros = RawTensor(torch.float32, (rows, self._width), bytes(4 * rows * self._width))
        output = tensors.tensor_to_pb(zeros)
        return pb.RunResponse(model=request.model, request_id=request.request_id, outputs={"output": output})

    async def Run(self, request: pb.RunRequest, context: Any) -> pb.RunResponse:
        return self._answer(request)

    async def RunStream(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: Any
    ) -> AsyncIterator[pb.RunStreamResponse]:
        async for request in request_iterator:
            yield pb.RunStreamResponse(request_id=request.request_id, response=self._answer(request))


async def serve(port: int, servicer: pb_grpc.InferenceServicer) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ],
    )
    registrar: Any = Registrar(server, CallPolicy(GrpcMetrics(CollectorRegistry()), None, CallsInFlight()))
    pb_grpc.add_InferenceServicer_to_server(servicer, registrar)  # type: ignore[no-untyped-call]
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
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--output-width", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, NullInference(args.output_width)))


if __name__ == "__main__":
    main()
