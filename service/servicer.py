"""gRPC servicers: decode protobuf, await the domain layer, encode. Nothing else.

Domain errors propagate to `service.errors.DomainErrorInterceptor`, except inside
`RunStream`, where a failed request is answered on that request and the stream
stays open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from loader.errors import Pt2ServeError
from scheduler.manager import InferenceResult, LoadedModel, ModelConfig, ModelManager
from service import convert
from service.errors import status_of
from service.health import ModelHealth
from service.pb import pt2serve_pb2 as pb
from service.pb import pt2serve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


def model_status(model: LoadedModel) -> pb.ModelStatus:
    config = model.config
    return pb.ModelStatus(
        name=config.name,
        package_path=config.package_path,
        model_name=config.model_name,
        run_single_threaded=config.run_single_threaded,
        num_runners=model.effective_runners,
        device_indices=list(config.device_indices),
        schema=convert.schema_to_pb(model.schema),
        batching=convert.batching_to_pb(model.scheduler.config),
        constants_version=model.constants_version,
        runtime=config.runtime,
    )


class ModelLoaderServicer(pb_grpc.ModelLoaderServicer):
    def __init__(self, manager: ModelManager, health: ModelHealth, path_resolver: Any) -> None:
        self._manager = manager
        self._health = health
        self._resolve = path_resolver

    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> pb.LoadModelResponse:
        config = ModelConfig(
            name=request.name,
            package_path=self._resolve(request.package_path),
            model_name=request.model_name or "model",
            run_single_threaded=request.run_single_threaded,
            num_runners=request.num_runners or 1,
            device_indices=tuple(request.device_indices) or (-1,),
            schema=convert.schema_from_pb(request.schema),
            batching=convert.batching_from_pb(request.batching),
            runtime=request.runtime or "native",
        )
        model = await self._manager.load(config)
        await self._health.set_serving(config.name, True)
        return pb.LoadModelResponse(model=model_status(model))

    async def UnloadModel(self, request: pb.UnloadModelRequest, context: Context) -> pb.UnloadModelResponse:
        self._manager.get(request.name)
        await self._health.set_serving(request.name, False)
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
        self, request: pb.LoadConstantsRequest, context: Context
    ) -> pb.ConstantUpdateResponse:
        tensors = convert.tensors_from_pb(request.constants, "constants")
        version = await self._manager.load_constants(
            request.name,
            tensors,
            use_inactive=request.use_inactive,
            check_full_update=request.check_full_update,
            user_managed=request.user_managed,
        )
        return pb.ConstantUpdateResponse(constants_version=version, updated=len(tensors))

    async def UpdateConstantBuffer(
        self, request: pb.UpdateConstantBufferRequest, context: Context
    ) -> pb.ConstantUpdateResponse:
        tensors = convert.tensors_from_pb(request.constants, "constants")
        version = await self._manager.update_constant_buffer(
            request.name,
            tensors,
            use_inactive=request.use_inactive,
            validate_full_updates=request.validate_full_updates,
            user_managed=request.user_managed,
        )
        return pb.ConstantUpdateResponse(constants_version=version, updated=len(tensors))

    async def SwapConstantBuffer(
        self, request: pb.SwapConstantBufferRequest, context: Context
    ) -> pb.ConstantUpdateResponse:
        version = await self._manager.swap_constant_buffer(request.name)
        return pb.ConstantUpdateResponse(constants_version=version)

    async def LoadMetadataFromPackage(
        self, request: pb.LoadMetadataFromPackageRequest, context: Context
    ) -> pb.GetMetadataResponse:
        metadata = await self._manager.load_metadata_from_package(
            self._resolve(request.package_path), request.model_name or "model"
        )
        return pb.GetMetadataResponse(metadata=metadata)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    async def _infer(self, request: pb.RunRequest, context: Context) -> pb.RunResponse:
        inputs = convert.tensors_from_pb(request.inputs, "inputs")
        remaining = context.time_remaining()
        result = await self._manager.infer(
            request.model,
            inputs,
            priority=request.priority,
            timeout_s=request.timeout_us / 1e6 if request.timeout_us else None,
            deadline=None if remaining is None else time.monotonic() + remaining,
            output_names=list(request.output_names),
        )
        return _response(request, result)

    async def Run(self, request: pb.RunRequest, context: Context) -> pb.RunResponse:
        return await self._infer(request, context)

    async def RunStream(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: Context
    ) -> AsyncIterator[pb.RunStreamResponse]:
        """Requests run concurrently; each answer is sent as soon as it is ready."""
        answers: asyncio.Queue[pb.RunStreamResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: pb.RunRequest) -> None:
            try:
                response = await self._infer(request, context)
                answers.put_nowait(pb.RunStreamResponse(request_id=request.request_id, response=response))
            except Pt2ServeError as exc:
                error = pb.Error(code=status_of(exc).value[0], message=str(exc))
                answers.put_nowait(pb.RunStreamResponse(request_id=request.request_id, error=error))
            except Exception as exc:
                log.exception("stream request %r failed", request.request_id)
                error = pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error: {exc}")
                answers.put_nowait(pb.RunStreamResponse(request_id=request.request_id, error=error))

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*list(pending))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader
        finally:
            # The client went away or the call was cancelled: withdraw its queued work.
            for task in (reader, *pending):
                task.cancel()
            await asyncio.gather(reader, *pending, return_exceptions=True)


def _response(request: pb.RunRequest, result: InferenceResult) -> pb.RunResponse:
    return pb.RunResponse(
        model=request.model,
        request_id=request.request_id,
        outputs={name: convert.tensor_to_pb(t) for name, t in result.outputs.items()},
        constants_version=result.constants_version,
    )
