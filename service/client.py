"""A small synchronous Python client for pt2serve, for one server or a fleet.

    with Pt2ServeClient("localhost:8500") as client:
        outputs = client.infer("demo", {"x": torch.randn(3, 16)})

A target is one address (`host:port`), several (`ipv4:10.0.0.1:8500,10.0.0.2:8500`,
or a list of `host:port` strings), or a DNS name resolved to every address
(`dns:///pt2serve-headless.ns.svc:8500`, a Kubernetes headless Service). With
several, calls are balanced round robin over the replicas that report ready, and
calls that fail with UNAVAILABLE (a replica that cannot be reached, or restarts) are retried on
another: the gRPC service config in `grpc_service_config.json`, the same file as
deploy/grpc-service-config.json for clients in other languages.
"""

from __future__ import annotations

import ipaddress
import json
import pathlib
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
# Round robin over ready replicas; inference and read-only calls retried on UNAVAILABLE.
SERVICE_CONFIG = (pathlib.Path(__file__).parent / "grpc_service_config.json").read_text()
# How often `infer_stream` sends one request again after UNAVAILABLE before giving up.
STREAM_ATTEMPTS = 5
STREAM_BACKOFF_S = 0.05


SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock")


def channel_target(target: str | Sequence[str]) -> str:
    """A gRPC channel target for one address, several, or a DNS name.

    `"host:port"` and targets with a scheme (`dns:///`, `ipv4:`, `ipv6:`, `unix:`)
    are used as they are. Several addresses (a list, or comma-separated) must be IP
    literals: they become an `ipv4:` or `ipv6:` target; for host names use
    `dns:///name:port`, which resolves to every address of the name.
    """
    if isinstance(target, str):
        if target.partition(":")[0] in SCHEMES or "," not in target:
            return target
        target = [t.strip() for t in target.split(",") if t.strip()]
    addresses = list(target)
    if not addresses:
        raise ValueError("no address given")
    if len(addresses) == 1:
        return addresses[0]
    versions = set()
    for address in addresses:
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            versions.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(
                f"{address!r}: several addresses must be IP literals; "
                "for a name with several addresses use dns:///name:port"
            ) from None
    if len(versions) != 1:
        raise ValueError("several addresses must all be IPv4 or all IPv6")
    return f"ipv{versions.pop()}:" + ",".join(addresses)


def _tensor(value: ArrayLike) -> pb.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return tensors.tensor_to_pb(tensor)


class Pt2ServeClient:
    def __init__(
        self,
        target: str | Sequence[str],
        *,
        max_message_bytes: int = tensors.DEFAULT_MAX_MESSAGE_BYTES,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: str | None = None,
        service_config: str | None = SERVICE_CONFIG,
    ) -> None:
        """`target`: one address, several, or `dns:///name:port` (see `channel_target`).
        `tls` (with `ca_file` for a private CA, `cert_file`/`key_file` for mutual TLS)
        and `token` (the management token, sent as a bearer token). `service_config`
        (JSON) balances and retries; None leaves gRPC's defaults (pick first, no
        retries)."""
        self.target = channel_target(target)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if service_config is not None:
            json.loads(service_config)  # a malformed config fails here, not on first call
            options.append(("grpc.service_config", service_config))
        credentials = channel_credentials(
            tls=tls or bool(ca_file or cert_file),
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            token=token,
        )
        if credentials is None:
            self.channel = grpc.insecure_channel(self.target, options=options)
        else:
            self.channel = grpc.secure_channel(self.target, credentials, options=options)
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

    def infer_stream(
        self,
        model: str,
        inputs: Iterable[Mapping[str, ArrayLike]],
        *,
        timeout_s: float | None = None,
        attempts: int = STREAM_ATTEMPTS,
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Stream requests (one per item of `inputs`, read lazily) and yield
        (index, outputs) as answers arrive, in any order.

        A request refused with UNAVAILABLE, or left unanswered when the stream ends
        with UNAVAILABLE (the replica drains), is sent again on a new stream, which
        the balancer opens on a replica that is ready; each request at most
        `attempts` times. Any other error raises (grpc.RpcError, or RuntimeError for
        an error answer).
        """
        source = iter(enumerate(inputs))
        # Requests read and not answered yet, how often each was sent, and whether
        # `inputs` has run out; shared with gRPC's sending thread.
        pending: dict[int, pb.RunRequest] = {}
        sent: dict[int, int] = {}
        read_all = threading.Event()
        lock = threading.Lock()
        # A stream that failed may still have a sending thread inside `inputs` when the
        # next one starts: reading it is serialised, apart from `lock` (an `inputs` that
        # waits for answers must not block them).
        reading = threading.Lock()

        def send(index: int) -> pb.RunRequest:
            with lock:
                sent[index] = sent.get(index, 0) + 1
                return pending[index]

        def requests(again: list[int]) -> Iterator[pb.RunRequest]:
            # Runs in gRPC's sending thread: what to send again first, then new ones.
            for index in again:
                yield send(index)
            while True:
                with reading:
                    item = next(source, None)
                if item is None:
                    read_all.set()
                    return
                index, values = item
                request = pb.RunRequest(
                    model=model, request_id=str(index), inputs={k: _tensor(v) for k, v in values.items()}
                )
                with lock:
                    pending[index] = request
                yield send(index)

        again: list[int] = []
        fruitless = 0  # streams in a row that ended UNAVAILABLE without one answer
        while True:
            answered = False
            try:
                for answer in self.inference.RunStream(requests(again), timeout=timeout_s):
                    answered = True
                    index = int(answer.request_id)
                    if answer.WhichOneof("result") == "error":
                        if answer.error.code == grpc.StatusCode.UNAVAILABLE.value[0]:
                            continue  # still pending: sent again on the next stream
                        raise RuntimeError(f"request {index}: {answer.error.message}")
                    with lock:
                        del pending[index]
                    yield index, decode_outputs(answer.response)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                fruitless = 0 if answered else fruitless + 1
                if fruitless >= attempts:
                    raise  # no replica answers at all
                time.sleep(min(STREAM_BACKOFF_S * 2**fruitless, 1.0))
            with lock:
                again = sorted(pending)
                spent = [i for i in again if sent.get(i, 0) >= attempts]
            if spent:
                raise RuntimeError(f"request {spent[0]}: no answer after {attempts} attempts (UNAVAILABLE)")
            if not again and read_all.is_set():
                return

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

    def discard_staged_constants(self, model: str) -> pb.ConstantUpdateResponse:
        """Forget what was staged with use_inactive; the served weights stay."""
        response: pb.ConstantUpdateResponse = self.loader.DiscardStagedConstants(
            pb.DiscardStagedConstantsRequest(name=model)
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
