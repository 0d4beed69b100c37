"""A small synchronous Python client for pt2serve.

with Pt2ServeClient("localhost:8500") as client:
    outputs = client.infer("demo", {"x": torch.randn(3, 16)})
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc
import numpy as np
import torch

from service import convert
from service.config import DEFAULT_MAX_MESSAGE_BYTES
from service.pb import pt2serve_pb2 as pb
from service.pb import pt2serve_pb2_grpc as pb_grpc

ArrayLike = torch.Tensor | np.ndarray[Any, Any]


def _tensor(value: ArrayLike) -> pb.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return convert.tensor_to_pb(tensor)


class Pt2ServeClient:
    def __init__(self, target: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.inference = pb_grpc.InferenceStub(self.channel)  # type: ignore[no-untyped-call]
        self.loader = pb_grpc.ModelLoaderStub(self.channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Pt2ServeClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def infer(
        self,
        model: str,
        inputs: Mapping[str, ArrayLike],
        *,
        timeout_s: float | None = None,
        priority: int = 0,
        output_names: Iterable[str] = (),
    ) -> dict[str, torch.Tensor]:
        request = pb.RunRequest(
            model=model,
            inputs={name: _tensor(v) for name, v in inputs.items()},
            priority=priority,
            output_names=list(output_names),
        )
        response = self.inference.Run(request, timeout=timeout_s)
        return decode_outputs(response)

    def infer_stream(self, requests: Iterable[pb.RunRequest]) -> Iterator[pb.RunStreamResponse]:
        return iter(self.inference.RunStream(iter(requests)))

    def list_models(self) -> list[pb.ModelStatus]:
        return list(self.loader.ListModels(pb.ListModelsRequest()).models)

    def load_model(self, name: str, package_path: str, **fields: Any) -> pb.ModelStatus:
        request = pb.LoadModelRequest(name=name, package_path=package_path, **fields)
        response: pb.LoadModelResponse = self.loader.LoadModel(request)
        return response.model

    def unload_model(self, name: str) -> None:
        self.loader.UnloadModel(pb.UnloadModelRequest(name=name))


def decode_outputs(response: pb.RunResponse) -> dict[str, torch.Tensor]:
    return convert.tensors_from_pb(response.outputs, "outputs")
