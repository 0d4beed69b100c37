"""The Open Inference Protocol (KServe v2) `inference.GRPCInferenceService`, served on
the same port as the native API and feeding the same scheduler. Like the native
servicer it only translates; domain errors map to the same status codes.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import AsyncIterator, Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
import torch

from pt2serve.loader.dtypes import BY_TORCH, TYPES, AnyTensor, RawTensor
from pt2serve.loader.errors import InvalidInput, ModelNotFound, Pt2ServeError, shown
from pt2serve.loader.schema import ModelSchema, TensorSpec
from pt2serve.scheduler.config import ModelConfig
from pt2serve.scheduler.dataplane import (
    InferenceOptions,
    InferencePlane,
    InferenceResult,
    OnDone,
    Withdrawable,
)
from pt2serve.scheduler.manager import ModelManager
from pt2serve.scheduler.registry import LoadedModel
from pt2serve.service.errors import message_of
from pt2serve.service.pb import grpc_service_pb2 as v2
from pt2serve.service.pb import grpc_service_pb2_grpc as v2_grpc
from pt2serve.service.servicer import Context, deadline_of
from pt2serve.service.streams import StreamProtocol, serve_stream
from pt2serve.service.tensors import check_shape, raw_tensor, tensor_bytes

PLATFORM = "pytorch_aoti"
MODEL_VERSION = "1"
EXTENSIONS = ["model_repository", "model_configuration", "statistics"]

# The protocol's datatype strings and Triton's config enum, from the one dtype table.
DATATYPES = {t.name: t.kserve for t in TYPES}
FROM_DATATYPE = {t.kserve: t for t in TYPES}
CONFIG_TYPES: dict[str, Any] = {t.name: v2.DataType.Value(f"TYPE_{t.kserve}") for t in TYPES}
# Types narrower than the typed-contents field that carries them (int32, uint32).
NARROW_INT_RANGES = {
    t.name: (int(torch.iinfo(t.torch).min), int(torch.iinfo(t.torch).max))
    for t in TYPES
    if t.name in ("int8", "int16", "uint8")
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


def decode_inputs(request: v2.ModelInferRequest, max_bytes: int | None = None) -> dict[str, AnyTensor]:
    """The request's input tensors, from raw contents (preferred) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: "
            "give every input raw, or none"
        )
    tensors: dict[str, AnyTensor] = {}
    for i, spec in enumerate(request.inputs):
        field = f"inputs[{shown(spec.name)}]"
        if spec.name in tensors:
            raise InvalidInput(f"{field}: given twice")
        element = FROM_DATATYPE.get(spec.datatype)
        if element is None:
            raise InvalidInput(f"{field}: datatype {shown(spec.datatype)} is not supported")
        shape = list(spec.shape)
        if raw:
            if spec.HasField("contents"):
                raise InvalidInput(f"{field}: has typed contents while raw_input_contents is used")
            tensors[spec.name] = raw_tensor(
                field,
                raw[i],
                element.name,
                shape,
                max_bytes,
                data_has="raw contents have",
                type_label=spec.datatype,
            )
            continue
        numel = check_shape(field, shape, element.itemsize, max_bytes)
        typed = element.kserve_contents
        if typed is None:
            raise InvalidInput(f"{field}: {spec.datatype} must be sent in raw_input_contents")
        values = list(getattr(spec.contents, typed))
        if len(values) != numel:
            raise InvalidInput(f"{field}: {typed} has {len(values)} values, shape {shape} needs {numel}")
        if element.name in NARROW_INT_RANGES and values:
            low, high = NARROW_INT_RANGES[element.name]
            if min(values) < low or max(values) > high:
                bad = next(v for v in values if not low <= v <= high)
                raise InvalidInput(
                    f"{field}: {typed} value {bad} is out of range for {spec.datatype} ({low}..{high})"
                )
        # Bytes, as raw contents would have been: no torch call on the event loop.
        data = np.asarray(values, dtype=element.numpy).tobytes()
        tensors[spec.name] = RawTensor(element.torch, tuple(shape), data)
    return tensors


def _infer_response(request: v2.ModelInferRequest, result: InferenceResult) -> v2.ModelInferResponse:
    return encode_response(request, result.outputs, result.constants_version)


def _stream_answer(request: v2.ModelInferRequest, result: InferenceResult) -> v2.ModelStreamInferResponse:
    return v2.ModelStreamInferResponse(infer_response=_infer_response(request, result))


def _stream_refusal(request: v2.ModelInferRequest, error: Pt2ServeError) -> v2.ModelStreamInferResponse:
    return v2.ModelStreamInferResponse(
        error_message=message_of(error), infer_response=v2.ModelInferResponse(id=request.id)
    )


def encode_response(
    request: v2.ModelInferRequest, outputs: Mapping[str, AnyTensor], constants_version: int
) -> v2.ModelInferResponse:
    response = v2.ModelInferResponse(
        model_name=request.model_name, model_version=MODEL_VERSION, id=request.id
    )
    response.parameters["constants_version"].int64_param = constants_version
    for name, tensor in outputs.items():
        response.outputs.add(name=name, datatype=BY_TORCH[tensor.dtype].kserve, shape=list(tensor.shape))
        response.raw_output_contents.append(tensor_bytes(tensor))
    return response


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    if spec.dims is None:
        return [-1]
    dims = [-1 if d.size is None else d.size for d in spec.dims]
    return dims[1:] if batched else dims


def _config_tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    """The fields ModelInput and ModelOutput share."""
    dtype = CONFIG_TYPES.get(spec.dtype or "", v2.TYPE_INVALID)
    return {"name": spec.name, "data_type": dtype, "dims": _dims(spec, batched)}


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
        draining: asyncio.Event | None = None,
        data: InferencePlane | None = None,
    ) -> None:
        self._draining = draining
        self._max_tensor_bytes = max_tensor_bytes
        self._manager = manager
        # Inference goes to `data` when given (a front end's link to the engine).
        self._data: InferencePlane = manager.data if data is None else data
        self._configured = configured
        self._confine = confine
        self._is_ready = is_ready

    # ------------------------------------------------------------- health
    async def ServerLive(self, request: v2.ServerLiveRequest, context: Context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context: Context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request: v2.ModelReadyRequest, context: Context) -> v2.ModelReadyResponse:
        loaded = request.name in {m.name for m in self._manager.models()}
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
        batching = model.batching
        config = v2.ModelConfig(
            name=model.config.name,
            platform=PLATFORM,
            backend="pt2serve",
            runtime=model.config.runtime,
            max_batch_size=batching.max_batch_size if schema.batched else 0,
            input=[v2.ModelInput(**_config_tensor(s, schema.batched)) for s in schema.inputs],
            output=[v2.ModelOutput(**_config_tensor(s, schema.batched)) for s in schema.outputs],
        )
        if schema.batched:
            config.dynamic_batching.CopyFrom(
                v2.ModelDynamicBatching(
                    preferred_batch_size=list(batching.preferred_batch_sizes),
                    max_queue_delay_microseconds=batching.max_queue_delay_us,
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
    def _decode(
        self, request: v2.ModelInferRequest, context: Context
    ) -> tuple[Mapping[str, AnyTensor], InferenceOptions]:
        _check_version(request.model_version)
        inputs = decode_inputs(request, self._max_tensor_bytes)
        priority = _param_number(request.parameters, "priority")
        timeout_us = _param_number(request.parameters, "timeout")
        options = InferenceOptions(
            # The protocol's levels start at 1 (highest); 0 means the default.
            priority=max(0, (priority or 1) - 1),
            timeout_s=timeout_us / 1e6 if timeout_us else None,
            deadline=deadline_of(context),
            output_names=tuple(o.name for o in request.outputs),
        )
        return inputs, options

    async def ModelInfer(self, request: v2.ModelInferRequest, context: Context) -> v2.ModelInferResponse:
        decode = functools.partial(self._decode, request, context)
        return _infer_response(request, await self._data.infer(request.model_name, decode))

    def ModelStreamInfer(
        self, request_iterator: AsyncIterator[v2.ModelInferRequest], context: Context
    ) -> AsyncIterator[v2.ModelStreamInferResponse]:
        """Answers in request order; a failed request is answered with `error_message`
        and the stream stays open."""

        def submit(request: v2.ModelInferRequest, on_done: OnDone) -> Withdrawable:
            decode = functools.partial(self._decode, request, context)
            return self._data.submit(request.model_name, decode, on_done)

        protocol = StreamProtocol(submit, _stream_answer, _stream_refusal)
        return serve_stream(request_iterator, protocol, ordered=True, stop=self._draining)

    # --------------------------------------------------------- repository
    async def RepositoryIndex(
        self, request: v2.RepositoryIndexRequest, context: Context
    ) -> v2.RepositoryIndexResponse:
        loaded = {m.name for m in self._manager.models()}
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
        await self._manager.registry.reload(config)
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
    stats = model.stats
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
