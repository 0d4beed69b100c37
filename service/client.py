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

from pt2serve.service import tensors
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.security import channel_credentials

ArrayLike = torch.Tensor | np.ndarray[Any, Any]
# Well under gRPC's default 4 MB limit, so uploads work against any server settings.
CHUNK_BYTES = 1 << 20


def _tensor(value: ArrayLike) -> pb.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return tensors.tensor_to_pb(tensor)


class Pt2ServeClient:
    def __init__(
        self,
        target: str,
        *,
        max_message_bytes: int = tensors.DEFAULT_MAX_MESSAGE_BYTES,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: str | None = None,
    ) -> None:
        """`tls` (with `ca_file` for a private CA, `cert_file`/`key_file` for mutual
        TLS) and `token` (the management token, sent as a bearer token)."""
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        credentials = channel_credentials(
            tls=tls or bool(ca_file or cert_file),
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            token=token,
        )
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=options)
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

    def list_models(self) -> list[pb.ModelStatus]:
        return list(self.loader.ListModels(pb.ListModelsRequest()).models)

    def load_model(self, name: str, package_path: str, **fields: Any) -> pb.ModelStatus:
        request = pb.LoadModelRequest(name=name, package_path=package_path, **fields)
        response: pb.LoadModelResponse = self.loader.LoadModel(request)
        return response.model

    def unload_model(self, name: str) -> None:
        self.loader.UnloadModel(pb.UnloadModelRequest(name=name))

    def load_constants(
        self,
        model: str,
        constants: Mapping[str, ArrayLike],
        *,
        use_inactive: bool = False,
        check_full_update: bool = False,
        label: str = "",
        chunk_bytes: int = CHUNK_BYTES,
    ) -> pb.ConstantUpdateResponse:
        """Upload constants by FQN, streamed in chunks of `chunk_bytes`: any size fits."""
        response: pb.ConstantUpdateResponse = self.loader.LoadConstants(
            constant_messages(
                model,
                constants,
                use_inactive=use_inactive,
                check_full_update=check_full_update,
                label=label,
                chunk_bytes=chunk_bytes,
            )
        )
        return response

    def swap_constants(self, model: str) -> pb.ConstantUpdateResponse:
        response: pb.ConstantUpdateResponse = self.loader.SwapConstantBuffer(
            pb.SwapConstantBufferRequest(name=model)
        )
        return response

    def load_constants_from_file(
        self,
        model: str,
        path: str,
        *,
        swap: bool = False,
        use_inactive: bool = False,
        check_full_update: bool = False,
        label: str = "",
    ) -> pb.ConstantUpdateResponse:
        """Have the server read a weight file under its model root."""
        request = pb.LoadConstantsFromFileRequest(
            name=model,
            path=path,
            swap=swap,
            use_inactive=use_inactive,
            check_full_update=check_full_update,
            label=label,
        )
        response: pb.ConstantUpdateResponse = self.loader.LoadConstantsFromFile(request)
        return response


def constant_messages(
    model: str,
    constants: Mapping[str, ArrayLike],
    *,
    use_inactive: bool,
    check_full_update: bool,
    label: str,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[pb.LoadConstantsRequest]:
    """The LoadConstants stream: flags first, then each constant in chunks, lazily."""
    yield pb.LoadConstantsRequest(
        name=model, use_inactive=use_inactive, check_full_update=check_full_update, label=label
    )
    for fqn, value in constants.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        for chunk in tensors.chunk_tensor(fqn, tensor, chunk_bytes):
            yield pb.LoadConstantsRequest(name=model, chunks=[chunk])


def decode_outputs(response: pb.RunResponse) -> dict[str, torch.Tensor]:
    return tensors.tensors_from_pb(response.outputs, "outputs")
