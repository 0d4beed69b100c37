"""The Open Inference Protocol (KServe v2) `inference.GRPCInferenceService`, served on
the same port as the native API and feeding the same scheduler. Like the native
servicer it only translates; domain errors map to the same status codes.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch

from pt2serve.loader.errors import InvalidInput, ModelNotFound, Pt2ServeError, shown
from pt2serve.loader.schema import DTYPE_NAMES, DTYPES, ModelSchema, TensorSpec
from pt2serve.scheduler.manager import LoadedModel, ModelConfig, ModelManager, PendingInference
from pt2serve.service.convert import check_shape, itemsize, tensor_bytes, tensor_from_wire
from pt2serve.service.errors import message_of
from pt2serve.service.pb import grpc_service_pb2 as v2
from pt2serve.service.pb import grpc_service_pb2_grpc as v2_grpc
from pt2serve.service.servicer import Context, deadline_of

log = logging.getLogger(__name__)
PLATFORM = "pytorch_aoti"
MODEL_VERSION = "1"
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]

# Our dtype names <-> the protocol's datatype strings and Triton's config enum.
DATATYPES = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "bfloat16": "BF16",
    "float32": "FP32",
    "float64": "FP64",
}
FROM_DATATYPE = {v: k for k, v in DATATYPES.items()}
CONFIG_TYPES = {
    "bool": v2.TYPE_BOOL,
    "uint8": v2.TYPE_UINT8,
    "int8": v2.TYPE_INT8,
    "int16": v2.TYPE_INT16,
    "int32": v2.TYPE_INT32,
    "int64": v2.TYPE_INT64,
    "float16": v2.TYPE_FP16,
    "bfloat16": v2.TYPE_BF16,
    "float32": v2.TYPE_FP32,
    "float64": v2.TYPE_FP64,
}
# Which typed-contents field carries each datatype (FP16/BF16 travel raw only).
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


# Types narrower than the typed-contents field that carries them (int32, uint32).
NARROW_INT_RANGES = {
    name: (int(torch.iinfo(DTYPES[name]).min), int(torch.iinfo(DTYPES[name]).max))
    for name in ("int8", "int16", "uint8")
}


def _server_version() -> str:
    try:
        return version("pt2serve")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


def _check_version(requested: str) -> None:
    if requested not in ("", MODEL_VERSION):
        raise ModelNotFound(
            f"model version {shown(requested)} does not exist; pt2serve serves version {MODEL_VERSION}"
        )


def _param_number(params: Mapping[str, v2.InferParameter], key: str) -> int | None:
    if key not in params:
        return None
    param = params[key]
    choice = param.WhichOneof("parameter_choice")
    if choice in ("int64_param", "uint64_param"):
        return int(getattr(param, choice))
    raise InvalidInput(f"parameters[{shown(key)}]: expected an integer, got {choice}")


def decode_inputs(request: v2.ModelInferRequest, max_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """The request's input tensors, from raw contents (preferred) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "give every input raw, or none"
        )
    tensors: dict[str, torch.Tensor] = {}
    for i, spec in enumerate(request.inputs):
        field = f"inputs[{shown(spec.name)}]"
        if spec.name in tensors:
            raise InvalidInput(f"{field}: given twice")
        name = FROM_DATATYPE.get(spec.datatype)
        if name is None:
            raise InvalidInput(f"{field}: datatype {shown(spec.datatype)} is not supported")
        shape = list(spec.shape)
        if raw:
            if spec.HasField("contents"):
                raise InvalidInput(f"{field}: has typed contents while raw_input_contents is used")
            tensors[spec.name] = tensor_from_wire(
                field, raw[i], name, shape, max_bytes, data_has="raw contents have", type_label=spec.datatype
            )
        else:
            numel = check_shape(field, shape, itemsize(name), max_bytes)
            typed = TYPED_FIELD.get(spec.datatype)
            if typed is None:
                raise InvalidInput(f"{field}: {spec.datatype} must be sent in raw_input_contents")
            dtype = DTYPES[name]
            values = list(getattr(spec.contents, typed))
            if len(values) != numel:
                raise InvalidInput(f"{field}: {typed} has {len(values)} values, shape {shape} needs {numel}")
            if name in NARROW_INT_RANGES and values:
                low, high = NARROW_INT_RANGES[name]
                if min(values) < low or max(values) > high:
                    bad = next(v for v in values if not low <= v <= high)
                    raise InvalidInput(
                        f"{field}: {typed} value {bad} is out of range for {spec.datatype} ({low}..{high})"
                    )
            tensor = torch.tensor(values, dtype=dtype) if values else torch.empty(0, dtype=dtype)
            tensors[spec.name] = tensor.reshape(shape)
    return tensors


def encode_response(
    request: v2.ModelInferRequest, outputs: Mapping[str, torch.Tensor], constants_version: int
) -> v2.ModelInferResponse:
    response = v2.ModelInferResponse(
        model_name=request.model_name, model_version=MODEL_VERSION, id=request.id
    )
    response.parameters["constants_version"].int64_param = constants_version
    for name, tensor in outputs.items():
        response.outputs.add(
            name=name, datatype=DATATYPES[DTYPE_NAMES[tensor.dtype]], shape=list(tensor.shape)
        )
        response.raw_output_contents.append(tensor_bytes(tensor))
    return response


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    if spec.dims is None:
        return [-1]
    dims = [-1 if d.size is None else d.size for d in spec.dims]
    return dims[1:] if batched else dims


def _metadata(spec: TensorSpec, batched: bool) -> v2.ModelMetadataResponse.TensorMetadata:
    shape = _dims(spec, False)
    if batched and shape:
        shape[0] = -1
    return v2.ModelMetadataResponse.TensorMetadata(
        name=spec.name, datatype=DATATYPES.get(spec.dtype or "", ""), shape=shape
    )


class KServeServicer(v2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        manager: ModelManager,
        configured: Mapping[str, ModelConfig],
        confine: Callable[[str, str], str],
        is_ready: Callable[[], bool],
        max_tensor_bytes: int | None = None,
    ) -> None:
        self._max_tensor_bytes = max_tensor_bytes
        self._manager = manager
        self._configured = configured
        self._confine = confine
        self._is_ready = is_ready

    # ------------------------------------------------------------- health
    async def ServerLive(self, request: v2.ServerLiveRequest, context: Context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context: Context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: v2.ModelReadyRequest, context: Context) -> v2.ModelReadyResponse:
        loaded = request.name in {m.config.name for m in self._manager.models()}
        return v2.ModelReadyResponse(ready=loaded and request.version in ("", MODEL_VERSION))

    async def ServerMetadata(
        self, request: v2.ServerMetadataRequest, context: Context
    ) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name="pt2serve", version=_server_version(), extensions=EXTENSIONS)

    # ----------------------------------------------------------- metadata
    def _model(self, name: str, requested_version: str) -> LoadedModel:
        _check_version(requested_version)
        return self._manager.get(name)

    async def ModelMetadata(
        self, request: v2.ModelMetadataRequest, context: Context
    ) -> v2.ModelMetadataResponse:
        model = self._model(request.name, request.version)
        schema = model.schema
        return v2.ModelMetadataResponse(
            name=model.config.name,
            versions=[MODEL_VERSION],
            platform=PLATFORM,
            inputs=[_metadata(s, schema.batched) for s in schema.inputs],
            outputs=[_metadata(s, schema.batched) for s in schema.outputs],
        )

    async def ModelConfig(self, request: v2.ModelConfigRequest, context: Context) -> v2.ModelConfigResponse:
        model = self._model(request.name, request.version)
        schema: ModelSchema = model.schema
        batching = model.scheduler.config
        config = v2.ModelConfig(
            name=model.config.name,
            platform=PLATFORM,
            backend="pt2serve",
            runtime=model.config.runtime,
            max_batch_size=batching.max_batch_size if schema.batched else 0,
            input=[
                v2.ModelInput(
                    name=s.name,
                    data_type=CONFIG_TYPES.get(s.dtype or "", v2.TYPE_INVALID),
                    dims=_dims(s, schema.batched),
                )
                for s in schema.inputs
            ],
            output=[
                v2.ModelOutput(
                    name=s.name,
                    data_type=CONFIG_TYPES.get(s.dtype or "", v2.TYPE_INVALID),
                    dims=_dims(s, schema.batched),
                )
                for s in schema.outputs
            ],
        )
        if schema.batched:
            config.dynamic_batching.CopyFrom(
                v2.ModelDynamicBatching(
                    preferred_batch_size=list(batching.preferred_batch_sizes),
                    max_queue_delay_microseconds=round(batching.max_queue_delay_s * 1e6),
                    priority_levels=batching.priority_levels,
                    default_priority_level=1,
                )
            )
        return v2.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: v2.ModelStatisticsRequest, context: Context
    ) -> v2.ModelStatisticsResponse:
        _check_version(request.version)
        models = [self._manager.get(request.name)] if request.name else self._manager.models()
        return v2.ModelStatisticsResponse(model_stats=[_statistics(m) for m in models])

    # ---------------------------------------------------------- inference
    def _submit(self, request: v2.ModelInferRequest, context: Context) -> PendingInference:
        try:
            _check_version(request.model_version)
            inputs = decode_inputs(request, self._max_tensor_bytes)
            priority = _param_number(request.parameters, "priority")
            timeout_us = _param_number(request.parameters, "timeout")
        except Pt2ServeError as exc:
            self._manager.note_rejected(request.model_name, exc)
            raise
        return self._manager.submit(
            request.model_name,
            inputs,
            # The protocol's levels start at 1 (highest); 0 means the default.
            priority=max(0, (priority or 1) - 1),
            timeout_s=timeout_us / 1e6 if timeout_us else None,
            deadline=deadline_of(context),
            output_names=[o.name for o in request.outputs],
        )

    async def ModelInfer(self, request: v2.ModelInferRequest, context: Context) -> v2.ModelInferResponse:
        pending = self._submit(request, context)
        await pending.future
        result = pending.result()
        return encode_response(request, result.outputs, result.constants_version)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[v2.ModelInferRequest], context: Context
    ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """Answers in request order; a failed request is answered with `error_message`
        and the stream stays open."""
        queue: asyncio.Queue[tuple[v2.ModelInferRequest, PendingInference | Exception] | None] = (
            asyncio.Queue()
        )
        order: collections.deque[asyncio.Future[Any]] = collections.deque()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    try:
                        submitted: PendingInference | Exception = self._submit(request, context)
                    except Exception as exc:
                        submitted = exc
                    if isinstance(submitted, PendingInference):
                        order.append(submitted.future)
                    queue.put_nowait((request, submitted))
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                request, outcome = item
                yield await self._stream_answer(request, outcome)
                if isinstance(outcome, PendingInference):
                    order.popleft()
            await reader
        finally:
            reader.cancel()
            for future in order:
                future.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    @staticmethod
    async def _stream_answer(
        request: v2.ModelInferRequest, outcome: PendingInference | Exception
    ) -> v2.ModelStreamInferResponse:
        try:
            if isinstance(outcome, Exception):
                raise outcome
            await asyncio.wait([outcome.future])
            result = outcome.result()
            return v2.ModelStreamInferResponse(
                infer_response=encode_response(request, result.outputs, result.constants_version)
            )
        except Pt2ServeError as exc:
            message = message_of(exc)
        except Exception as exc:
            log.exception("stream request %r failed", request.id)
            message = f"internal error: {exc}"
        return v2.ModelStreamInferResponse(
            error_message=message, infer_response=v2.ModelInferResponse(id=request.id)
        )

    # --------------------------------------------------------- repository
    async def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, context: Context
    ) -> v2.RepositoryIndexResponse:
        loaded = {m.config.name for m in self._manager.models()}
        names = sorted(loaded | set(self._configured))
        index = [
            v2.RepositoryIndexResponse.ModelIndex(
                name=n,
                version=MODEL_VERSION,
                state="READY" if n in loaded else "UNAVAILABLE",
                reason="" if n in loaded else "unloaded",
            )
            for n in names
        ]
        if request.ready:
            index = [m for m in index if m.state == "READY"]
        return v2.RepositoryIndexResponse(models=index)

    async def RepositoryModelLoad(
        self, request: v2.RepositoryModelLoadRequest, context: Context
    ) -> v2.RepositoryModelLoadResponse:
        name = request.model_name
        config = self._configured.get(name)
        if "package_path" in request.parameters:
            path = request.parameters["package_path"].string_param
            config = ModelConfig(name=name, package_path=self._confine(path, "parameters['package_path']"))
        elif config is None:
            config = ModelConfig(name=name, package_path=self._confine(f"{name}.pt2", "model_name"))
        # Triton's semantics: loading a loaded model reloads it. The new one replaces
        # the old only once it is ready; if it fails, the old one keeps serving.
        await self._manager.reload(config)
        return v2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: v2.RepositoryModelUnloadRequest, context: Context
    ) -> v2.RepositoryModelUnloadResponse:
        await self._manager.unload(request.model_name)
        return v2.RepositoryModelUnloadResponse()


SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def _duration(count: int, seconds: float) -> v2.StatisticDuration:
    return v2.StatisticDuration(count=count, ns=int(seconds * 1e9))


def _statistics(model: LoadedModel) -> v2.ModelStatistics:
    stats = model.scheduler.stats
    requests = model.requests
    batch_counts = collections.Counter(stats.batch_sizes)
    return v2.ModelStatistics(
        name=model.config.name,
        version=MODEL_VERSION,
        last_inference=int(stats.last_batch_at * 1000),
        inference_count=stats.rows,
        execution_count=stats.batches,
        inference_stats=v2.InferStatistics(
            success=_duration(requests.succeeded, requests.succeeded_seconds),
            fail=_duration(requests.failed, requests.failed_seconds),
            queue=_duration(stats.requests, stats.queue_seconds),
            compute_infer=_duration(stats.batches, stats.compute_seconds),
        ),
        batch_stats=[
            v2.InferBatchStatistics(batch_size=size, compute_infer=v2.StatisticDuration(count=count))
            for size, count in sorted(batch_counts.items())
        ],
    )
