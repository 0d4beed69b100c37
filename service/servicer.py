"""gRPC servicers: decode protobuf, await the domain layer, encode. Nothing else.

Domain errors propagate to `service.errors.DomainErrorInterceptor`, except inside
`RunStream`, where a failed request is answered on that request and the stream
stays open.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from pt2serve.loader.errors import InvalidInput, Pt2ServeError
from pt2serve.scheduler.manager import (
    ConstantUpdateResult,
    InferenceResult,
    LoadedModel,
    ModelConfig,
    ModelManager,
    PendingInference,
)
from pt2serve.service import convert
from pt2serve.service.errors import message_of, status_of
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.pb import pt2serve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]


def deadline_of(context: Context) -> float | None:
    """The call's gRPC deadline on the scheduler's clock (time.monotonic), if it has one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


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
        constants_label=model.constants_label,
        statistics=pb.ModelStatistics(
            requests=model.scheduler.stats.requests,
            batches=model.scheduler.stats.batches,
            rows=model.scheduler.stats.rows,
            queue_depth=model.scheduler.queue_depth,
            batches_in_flight=model.scheduler.batches_in_flight,
        ),
    )


class ModelLoaderServicer(pb_grpc.ModelLoaderServicer):
    def __init__(
        self,
        manager: ModelManager,
        path_resolver: Any,
        max_tensor_bytes: int | None = None,
    ) -> None:
        self._max_tensor_bytes = max_tensor_bytes
        self._manager = manager
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
        upload = self._manager.begin_constant_upload(
            first.name,
            by_fqn=True,
            use_inactive=first.use_inactive,
            full=first.check_full_update,
            user_managed=first.user_managed,
            label=first.label,
        )
        sizes = {
            s.fqn: s.numel() * convert.itemsize(s.dtype) for s in self._manager.get_constants(first.name)
        }
        assembler = convert.ChunkAssembler(sizes.get)
        async with upload:
            message = first
            while True:
                constants = convert.tensors_from_pb(message.constants, "constants", self._max_tensor_bytes)
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
        result, ignored = await self._manager.load_constants_from_file(
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
        tensors = convert.tensors_from_pb(request.constants, "constants", self._max_tensor_bytes)
        result = await self._manager.update_constant_buffer(
            request.name,
            tensors,
            use_inactive=request.use_inactive,
            validate_full_updates=request.validate_full_updates,
            user_managed=request.user_managed,
            label=request.label,
        )
        return _constant_response(result)

    async def SwapConstantBuffer(
        self, request: pb.SwapConstantBufferRequest, context: Context
    ) -> pb.ConstantUpdateResponse:
        return _constant_response(await self._manager.swap_constant_buffer(request.name))

    async def LoadMetadataFromPackage(
        self, request: pb.LoadMetadataFromPackageRequest, context: Context
    ) -> pb.GetMetadataResponse:
        metadata = await self._manager.load_metadata_from_package(
            self._resolve(request.package_path), request.model_name or "model"
        )
        return pb.GetMetadataResponse(metadata=metadata)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, manager: ModelManager, max_tensor_bytes: int | None = None) -> None:
        self._max_tensor_bytes = max_tensor_bytes
        self._manager = manager

    def _submit(
        self,
        request: pb.RunRequest,
        context: Context,
        on_done: Callable[[PendingInference], None] | None = None,
    ) -> PendingInference:
        try:
            inputs = convert.tensors_from_pb(request.inputs, "inputs", self._max_tensor_bytes)
        except Pt2ServeError as exc:
            self._manager.note_rejected(request.model, exc)
            raise
        return self._manager.submit(
            request.model,
            inputs,
            priority=request.priority,
            timeout_s=request.timeout_us / 1e6 if request.timeout_us else None,
            deadline=deadline_of(context),
            output_names=list(request.output_names),
            on_done=on_done,
        )

    async def Run(self, request: pb.RunRequest, context: Context) -> pb.RunResponse:
        pending = self._submit(request, context)
        await pending.future
        return _response(request, pending.result())

    async def RunStream(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: Context
    ) -> AsyncIterator[pb.RunStreamResponse]:
        """Requests run concurrently; each answer is sent as soon as it is ready, or
        in request order when the call carries the metadata `pt2serve-ordered: true`."""
        answers = _StreamAnswers(_metadata_flag(context, ORDERED_METADATA_KEY))
        pending: set[asyncio.Future[Any]] = set()

        def answer(request: pb.RunRequest, outcome: PendingInference | Exception, slot: _Slot) -> None:
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                stream_response = pb.RunStreamResponse(request_id=request.request_id)
                _fill_response(stream_response.response, request, outcome.result())
                answers.fill(slot, stream_response)
                return
            except Pt2ServeError as exc:
                error = pb.Error(code=status_of(exc).value[0], message=message_of(exc))
            except Exception as exc:
                log.exception("stream request %r failed", request.request_id)
                error = pb.Error(code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error: {exc}")
            answers.fill(slot, pb.RunStreamResponse(request_id=request.request_id, error=error))

        def settled(request: pb.RunRequest, slot: _Slot, submitted: PendingInference) -> None:
            pending.discard(submitted.future)
            if not submitted.future.cancelled():
                answer(request, submitted, slot)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    slot = answers.reserve()
                    try:
                        submitted = self._submit(request, context, functools.partial(settled, request, slot))
                    except Exception as exc:
                        answer(request, exc, slot)
                        continue
                    pending.add(submitted.future)
                if pending:
                    await asyncio.wait(list(pending))
            finally:
                answers.close()

        reader = asyncio.create_task(read())
        try:
            while (batch := await answers.take()) is not None:
                for item in batch:
                    yield item
            await reader
        finally:
            # The client went away or the call was cancelled: withdraw its queued work.
            reader.cancel()
            for future in list(pending):
                future.cancel()
            await asyncio.gather(reader, return_exceptions=True)


ORDERED_METADATA_KEY = "pt2serve-ordered"


def _metadata_flag(context: Context, key: str) -> bool:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            text = value if isinstance(value, str) else value.decode()
            return text.strip().lower() in ("1", "true", "yes")
    return False


class _Slot:
    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: pb.RunStreamResponse | None = None


_UNORDERED = _Slot()


class _StreamAnswers:
    """A stream's responses: sent as they complete, or held back to request order.

    Filled by callbacks on the loop and drained by the stream's writer, which takes
    everything ready at once: one wake-up of the writer per burst, not per answer.
    """

    def __init__(self, ordered: bool) -> None:
        self._ready: list[pb.RunStreamResponse] = []
        self._closed = False
        self._wakeup: asyncio.Future[None] | None = None
        self._ordered = ordered
        self._waiting: collections.deque[_Slot] = collections.deque()

    def reserve(self) -> _Slot:
        if not self._ordered:
            return _UNORDERED  # never written: unordered answers go straight out
        slot = _Slot()
        self._waiting.append(slot)
        return slot

    def fill(self, slot: _Slot, response: pb.RunStreamResponse) -> None:
        if not self._ordered:
            self._ready.append(response)
        else:
            slot.response = response
            while self._waiting and self._waiting[0].response is not None:
                self._ready.append(self._waiting.popleft().response)  # type: ignore[arg-type]
        if self._ready:
            self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def take(self) -> list[pb.RunStreamResponse] | None:
        """Every response ready now (waiting for one); None once closed and drained."""
        while not self._ready:
            if self._closed:
                return None
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        ready, self._ready = self._ready, []
        return ready


def _constant_response(
    result: ConstantUpdateResult, ignored: list[str] | None = None
) -> pb.ConstantUpdateResponse:
    return pb.ConstantUpdateResponse(
        constants_version=result.version,
        updated=result.updated,
        constants_label=result.label,
        ignored=ignored or [],
    )


def _response(request: pb.RunRequest, result: InferenceResult) -> pb.RunResponse:
    response = pb.RunResponse()
    _fill_response(response, request, result)
    return response


def _fill_response(response: pb.RunResponse, request: pb.RunRequest, result: InferenceResult) -> None:
    """Write the answer into an empty `response` in place: building it inside its
    stream message avoids copying every output (this runs for every request)."""
    response.model = request.model
    response.request_id = request.request_id
    response.constants_version = result.constants_version
    for name, tensor in result.outputs.items():
        convert.fill_tensor_pb(response.outputs[name], tensor)
