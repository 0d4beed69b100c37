from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT8: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType
BFLOAT16: DType
FLOAT64: DType
INT8: DType
INT16: DType
INT32: DType
INT64: DType
UINT8: DType
BOOL: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DimSpec(_message.Message):
    __slots__ = ("size", "min", "max")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    size: int
    min: int
    max: int
    def __init__(self, size: _Optional[int] = ..., min: _Optional[int] = ..., max: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "dims", "shape_known")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_KNOWN_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    dims: _containers.RepeatedCompositeFieldContainer[DimSpec]
    shape_known: bool
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., dims: _Optional[_Iterable[_Union[DimSpec, _Mapping]]] = ..., shape_known: _Optional[bool] = ...) -> None: ...

class ModelSchema(_message.Message):
    __slots__ = ("inputs", "outputs", "batched", "source")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    BATCHED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    batched: bool
    source: str
    def __init__(self, inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., batched: _Optional[bool] = ..., source: _Optional[str] = ...) -> None: ...

class BatchingConfig(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_us", "max_queue_size", "default_timeout_us", "priority_levels", "preferred_batch_sizes", "max_rows_per_request")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_LEVELS_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_us: int
    max_queue_size: int
    default_timeout_us: int
    priority_levels: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_rows_per_request: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., default_timeout_us: _Optional[int] = ..., priority_levels: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., max_rows_per_request: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "package_path", "model_name", "run_single_threaded", "num_runners", "device_indices", "schema", "batching", "runtime", "skip_warmup")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    RUN_SINGLE_THREADED_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDICES_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    SKIP_WARMUP_FIELD_NUMBER: _ClassVar[int]
    name: str
    package_path: str
    model_name: str
    run_single_threaded: bool
    num_runners: int
    device_indices: _containers.RepeatedScalarFieldContainer[int]
    schema: ModelSchema
    batching: BatchingConfig
    runtime: str
    skip_warmup: bool
    def __init__(self, name: _Optional[str] = ..., package_path: _Optional[str] = ..., model_name: _Optional[str] = ..., run_single_threaded: _Optional[bool] = ..., num_runners: _Optional[int] = ..., device_indices: _Optional[_Iterable[int]] = ..., schema: _Optional[_Union[ModelSchema, _Mapping]] = ..., batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., runtime: _Optional[str] = ..., skip_warmup: _Optional[bool] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "package_path", "model_name", "run_single_threaded", "num_runners", "device_indices", "schema", "batching", "constants_version", "runtime", "statistics", "constants_label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    RUN_SINGLE_THREADED_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDICES_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    package_path: str
    model_name: str
    run_single_threaded: bool
    num_runners: int
    device_indices: _containers.RepeatedScalarFieldContainer[int]
    schema: ModelSchema
    batching: BatchingConfig
    constants_version: int
    runtime: str
    statistics: ModelStatistics
    constants_label: str
    def __init__(self, name: _Optional[str] = ..., package_path: _Optional[str] = ..., model_name: _Optional[str] = ..., run_single_threaded: _Optional[bool] = ..., num_runners: _Optional[int] = ..., device_indices: _Optional[_Iterable[int]] = ..., schema: _Optional[_Union[ModelSchema, _Mapping]] = ..., batching: _Optional[_Union[BatchingConfig, _Mapping]] = ..., constants_version: _Optional[int] = ..., runtime: _Optional[str] = ..., statistics: _Optional[_Union[ModelStatistics, _Mapping]] = ..., constants_label: _Optional[str] = ...) -> None: ...

class ModelStatistics(_message.Message):
    __slots__ = ("requests", "batches", "rows", "queue_depth", "batches_in_flight")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    requests: int
    batches: int
    rows: int
    queue_depth: int
    batches_in_flight: int
    def __init__(self, requests: _Optional[int] = ..., batches: _Optional[int] = ..., rows: _Optional[int] = ..., queue_depth: _Optional[int] = ..., batches_in_flight: _Optional[int] = ...) -> None: ...

class LoadModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: ModelStatus
    def __init__(self, model: _Optional[_Union[ModelStatus, _Mapping]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class GetMetadataRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetMetadataResponse(_message.Message):
    __slots__ = ("metadata",)
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    METADATA_FIELD_NUMBER: _ClassVar[int]
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetCallSpecRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetCallSpecResponse(_message.Message):
    __slots__ = ("in_spec", "out_spec", "input_names", "output_names")
    IN_SPEC_FIELD_NUMBER: _ClassVar[int]
    OUT_SPEC_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    in_spec: str
    out_spec: str
    input_names: _containers.RepeatedScalarFieldContainer[str]
    output_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, in_spec: _Optional[str] = ..., out_spec: _Optional[str] = ..., input_names: _Optional[_Iterable[str]] = ..., output_names: _Optional[_Iterable[str]] = ...) -> None: ...

class GetConstantFqnsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ConstantInfo(_message.Message):
    __slots__ = ("fqn", "internal_name", "dtype", "shape")
    FQN_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    fqn: str
    internal_name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, fqn: _Optional[str] = ..., internal_name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class GetConstantFqnsResponse(_message.Message):
    __slots__ = ("constants",)
    CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    constants: _containers.RepeatedCompositeFieldContainer[ConstantInfo]
    def __init__(self, constants: _Optional[_Iterable[_Union[ConstantInfo, _Mapping]]] = ...) -> None: ...

class LoadConstantsRequest(_message.Message):
    __slots__ = ("name", "constants", "use_inactive", "check_full_update", "user_managed", "chunks", "label")
    class ConstantsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    USE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    CHECK_FULL_UPDATE_FIELD_NUMBER: _ClassVar[int]
    USER_MANAGED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    constants: _containers.MessageMap[str, Tensor]
    use_inactive: bool
    check_full_update: bool
    user_managed: bool
    chunks: _containers.RepeatedCompositeFieldContainer[TensorChunk]
    label: str
    def __init__(self, name: _Optional[str] = ..., constants: _Optional[_Mapping[str, Tensor]] = ..., use_inactive: _Optional[bool] = ..., check_full_update: _Optional[bool] = ..., user_managed: _Optional[bool] = ..., chunks: _Optional[_Iterable[_Union[TensorChunk, _Mapping]]] = ..., label: _Optional[str] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("fqn", "dtype", "shape", "offset", "data")
    FQN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    fqn: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    def __init__(self, fqn: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class LoadConstantsFromFileRequest(_message.Message):
    __slots__ = ("name", "path", "use_inactive", "check_full_update", "swap", "label")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    USE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    CHECK_FULL_UPDATE_FIELD_NUMBER: _ClassVar[int]
    SWAP_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    use_inactive: bool
    check_full_update: bool
    swap: bool
    label: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., use_inactive: _Optional[bool] = ..., check_full_update: _Optional[bool] = ..., swap: _Optional[bool] = ..., label: _Optional[str] = ...) -> None: ...

class UpdateConstantBufferRequest(_message.Message):
    __slots__ = ("name", "constants", "use_inactive", "validate_full_updates", "user_managed", "label")
    class ConstantsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_FIELD_NUMBER: _ClassVar[int]
    USE_INACTIVE_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_FULL_UPDATES_FIELD_NUMBER: _ClassVar[int]
    USER_MANAGED_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    constants: _containers.MessageMap[str, Tensor]
    use_inactive: bool
    validate_full_updates: bool
    user_managed: bool
    label: str
    def __init__(self, name: _Optional[str] = ..., constants: _Optional[_Mapping[str, Tensor]] = ..., use_inactive: _Optional[bool] = ..., validate_full_updates: _Optional[bool] = ..., user_managed: _Optional[bool] = ..., label: _Optional[str] = ...) -> None: ...

class SwapConstantBufferRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DiscardStagedConstantsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ConstantUpdateResponse(_message.Message):
    __slots__ = ("constants_version", "updated", "constants_label", "ignored")
    CONSTANTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_LABEL_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    constants_version: int
    updated: int
    constants_label: str
    ignored: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, constants_version: _Optional[int] = ..., updated: _Optional[int] = ..., constants_label: _Optional[str] = ..., ignored: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadMetadataFromPackageRequest(_message.Message):
    __slots__ = ("package_path", "model_name")
    PACKAGE_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    package_path: str
    model_name: str
    def __init__(self, package_path: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("model", "request_id", "inputs", "priority", "timeout_us", "output_names")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAMES_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    inputs: _containers.MessageMap[str, Tensor]
    priority: int
    timeout_us: int
    output_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., priority: _Optional[int] = ..., timeout_us: _Optional[int] = ..., output_names: _Optional[_Iterable[str]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("model", "request_id", "outputs", "constants_version")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CONSTANTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    outputs: _containers.MessageMap[str, Tensor]
    constants_version: int
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., outputs: _Optional[_Mapping[str, Tensor]] = ..., constants_version: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RunStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: RunResponse
    error: Error
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[RunResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
