"""The native pt2serve.v1 services: each RPC decodes its request, awaits the domain
layer (registry, data plane, constant operations) and encodes the answer. Domain
errors become status codes in service/calls.py; streaming inference runs on the
shared stream engine (service/streams.py)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from pt2serve.loader import defaults
from pt2serve.loader.dtypes import RawTensor
from pt2serve.loader.errors import InvalidInput, Pt2ServeError
from pt2serve.scheduler.config import ModelConfig
from pt2serve.scheduler.constants import ConstantUpdateResult
from pt2serve.scheduler.dataplane import (
    InferenceOptions,
    InferencePlane,
    InferenceResult,
    OnDone,
    Withdrawable,
)
from pt2serve.scheduler.manager import ModelManager
from pt2serve.scheduler.registry import LoadedModel
from pt2serve.service import convert, tensors
from pt2serve.service.errors import message_of, status_of
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc
from pt2serve.service.streams import StreamProtocol, serve_stream

Context = grpc.aio.ServicerContext[Any, Any]
ORDERED_METADATA_KEY = "pt2serve-ordered"


def deadline_of(context: Context) -> float | None:
    """The call's gRPC deadline on the scheduler's clock (time.monotonic), if it has one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def metadata_flag(context: Context, key: str) -> bool:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            text = value if isinstance(value, str) else value.decode()
            return text.strip().lower() in ("1", "true", "yes")
    return False


def model_status(model: LoadedModel) -> pb.ModelStatus:
    config = model.config
    return pb.ModelStatus(
        name=config.name,
        package_path=config.package_path,
        model_name=config.model_name,
        run_single_threaded=config.run_single_threaded,
        num_runners=config.runners_per_device,
        device_indices=list(config.device_indices),
        schema=convert.schema_to_pb(model.schema),
        batching=convert.batching_to_pb(model.batching),
        constants_version=model.constants_version,
        runtime=config.runtime,
        constants_label=model.constants_label,
        statistics=pb.ModelStatistics(
            requests=model.stats.requests,
            batches=model.stats.batches,
            rows=model.stats.rows,
            queue_depth=model.queue_depth,
            batches_in_flight=model.batches_in_flight,
        ),
    )


class ModelLoaderServicer(pb_grpc.ModelLoaderServicer):
    def __init__(
        self,
        manager: ModelManager,
        path_resolver: Callable[..., str],
        max_tensor_bytes: int | None = None,
    ) -> None:
        self._max_tensor_bytes = max_tensor_bytes
        self._manager = manager
        self._resolve = path_resolver

    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> pb.LoadModelResponse:
        config = ModelConfig(
            name=request.name,
            package_path=self._resolve(request.package_path),
            model_name=request.model_name or defaults.MODEL_NAME,
            run_single_threaded=request.run_single_threaded,
            num_runners=request.num_runners or defaults.NUM_RUNNERS,
            device_indices=tuple(request.device_indices) or defaults.DEVICE_INDICES,
            schema=convert.schema_from_pb(request.schema),
            batching=convert.batching_from_pb(request.batching),
            runtime=request.runtime or defaults.RUNTIME,
            warmup=not request.skip_warmup,
        )
        model = await self._manager.load(config)
        return pb.LoadModelResponse(model=model_status(model))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Context) -> pb.UnloadModelResponse:
        await self._manager.unload(request.name)
        return pb.UnloadModelResponse()

    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_status(m) for m in self._manager.models()])

    async def GetMetadata(self, request: pb.GetMetadataRequest, context: Context) -> pb.GetMetadataResponse:
        return pb.GetMetadataResponse(metadata=self._manager.get_metadata(request.name))

    async def GetCallSpec(self, request: pb.GetCallSpecRequest, context: Context) -> pb.GetCallSpecResponse:
        spec = self._manager.get_call_spec(request.name)
        return pb.GetCallSpecResponse(
            in_spec=spec.in_spec,
            out_spec=spec.out_spec,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
        )

    async def GetConstantFqns(
        self, request: pb.GetConstantFqnsRequest, context: Context
    ) -> pb.GetConstantFqnsResponse:
        specs = self._manager.get_constants(request.name)
        return pb.GetConstantFqnsResponse(constants=[convert.constant_to_pb(s) for s in specs])

    async def LoadConstants(
        self, request_iterator: AsyncIterator[pb.LoadConstantsRequest], context: Context
    ) -> pb.ConstantUpdateResponse:
        messages = request_iterator.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            raise InvalidInput("LoadConstants: the stream carried no message") from None
        upload = self._manager.constants.begin_upload(
            first.name,
            by_fqn=True,
            use_inactive=first.use_inactive,
            full=first.check_full_update,
            user_managed=first.user_managed,
            label=first.label,
        )
        sizes = {
            s.fqn: s.numel() * tensors.itemsize(s.dtype) for s in self._manager.get_constants(first.name)
        }
        assembler = tensors.ChunkAssembler(sizes.get)
        async with upload:
            message = first
            while True:
                constants = tensors.tensors_from_pb(message.constants, "constants", self._max_tensor_bytes)
                for fqn, tensor in constants.items():
                    await upload.add(fqn, tensor)
                for chunk in message.chunks:
                    if (complete := assembler.add(chunk)) is not None:
                        await upload.add(*complete)
                try:
                    message = await messages.__anext__()
                except StopAsyncIteration:
                    break
            assembler.finish()
            result = await upload.commit()
        return _constant_response(result)

    async def LoadConstantsFromFile(
        self, request: pb.LoadConstantsFromFileRequest, context: Context
    ) -> pb.ConstantUpdateResponse:
        result, ignored = await self._manager.constants.load_from_file(
            request.name,
            self._resolve(request.path, "path"),
            use_inactive=request.use_inactive or request.swap,
            full=request.check_full_update,
            swap=request.swap,
            label=request.label,
        )
        return _constant_response(result, ignored)

    async def UpdateConstantBuffer(
        self, request: pb.UpdateConstantBufferRequest, context: Context
    ) -> pb.ConstantUpdateResponse:
        received = tensors.tensors_from_pb(request.constants, "constants", self._max_tensor_bytes)
        result = await self._manager.constants.apply(
            request.name,
            received,
            by_fqn=False,
            use_inactive=request.use_inactive,
            full=request.validate_full_updates,
            user_managed=request.user_managed,
            label=request.label,
        )
        return _constant_response(result)

    async def SwapConstantBuffer(
        self, request: pb.SwapConstantBufferRequest, context: Context
    ) -> pb.ConstantUpdateResponse:
        return _constant_response(await self._manager.constants.swap(request.name))

    async def DiscardStagedConstants(
        self, request: pb.DiscardStagedConstantsRequest, context: Context
    ) -> pb.ConstantUpdateResponse:
        return _constant_response(await self._manager.constants.discard(request.name))

    async def LoadMetadataFromPackage(
        self, request: pb.LoadMetadataFromPackageRequest, context: Context
    ) -> pb.GetMetadataResponse:
        metadata = await self._manager.load_metadata_from_package(
            self._resolve(request.package_path), request.model_name or defaults.MODEL_NAME
        )
        return pb.GetMetadataResponse(metadata=metadata)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(
        self,
        data: InferencePlane,
        max_tensor_bytes: int | None = None,
        draining: asyncio.Event | None = None,
    ) -> None:
        self._max_tensor_bytes = max_tensor_bytes
        self._data = data
        # Set at the GOAWAY (service/shutdown.py): open streams stop reading, answer
        # what they read and end UNAVAILABLE.
        self._draining = draining

    def _decode(
        self, request: pb.RunRequest, context: Context
    ) -> tuple[Mapping[str, RawTensor], InferenceOptions]:
        inputs = tensors.raw_tensors_from_pb(request.inputs, "inputs", self._max_tensor_bytes)
        options = InferenceOptions(
            priority=request.priority,
            timeout_s=request.timeout_us / 1e6 if request.timeout_us else None,
            deadline=deadline_of(context),
            output_names=tuple(request.output_names),
        )
        return inputs, options

    async def Run(self, request: pb.RunRequest, context: Context) -> pb.RunResponse:
        result = await self._data.infer(request.model, functools.partial(self._decode, request, context))
        response = pb.RunResponse()
        _fill_response(response, request, result)
        return response

    def RunStream(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: Context
    ) -> AsyncIterator[pb.RunStreamResponse]:
        """Answers in completion order, or in request order when the call carries the
        metadata `pt2serve-ordered: true`."""

        def submit(request: pb.RunRequest, on_done: OnDone) -> Withdrawable:
            decode = functools.partial(self._decode, request, context)
            return self._data.submit(request.model, decode, on_done)

        protocol = StreamProtocol(submit, _stream_answer, _stream_refusal)
        ordered = metadata_flag(context, ORDERED_METADATA_KEY)
        return serve_stream(request_iterator, protocol, ordered=ordered, stop=self._draining)


def _stream_answer(request: pb.RunRequest, result: InferenceResult) -> pb.RunStreamResponse:
    answer = pb.RunStreamResponse(request_id=request.request_id)
    _fill_response(answer.response, request, result)
    return answer


def _stream_refusal(request: pb.RunRequest, error: Pt2ServeError) -> pb.RunStreamResponse:
    error_pb = pb.Error(code=status_of(error).value[0], message=message_of(error))
    return pb.RunStreamResponse(request_id=request.request_id, error=error_pb)


def _constant_response(
    result: ConstantUpdateResult, ignored: list[str] | None = None
) -> pb.ConstantUpdateResponse:
    return pb.ConstantUpdateResponse(
        constants_version=result.version,
        updated=result.updated,
        constants_label=result.label,
        ignored=ignored or [],
    )


def _fill_response(response: pb.RunResponse, request: pb.RunRequest, result: InferenceResult) -> None:
    """Write the answer into an empty `response` in place: building it inside its
    stream message avoids copying every output (this runs for every request)."""
    response.model = request.model
    response.request_id = request.request_id
    response.constants_version = result.constants_version
    for name, tensor in result.outputs.items():
        tensors.fill_tensor_pb(response.outputs[name], tensor)
