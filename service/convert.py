"""pt2serve.v1 messages <-> domain types: schemas, batching configs, constants."""

from __future__ import annotations

from pt2serve.loader.errors import InvalidInput
from pt2serve.loader.schema import ConstantSpec, Dim, ModelSchema, TensorSpec
from pt2serve.scheduler.config import BatchingConfig
from pt2serve.service.pb import pt2serve_pb2 as pb
from pt2serve.service.tensors import dtype_from_pb, dtype_to_pb


def schema_to_pb(schema: ModelSchema) -> pb.ModelSchema:
    def spec(s: TensorSpec) -> pb.TensorSpec:
        dims = [
            pb.DimSpec(size=-1 if d.size is None else d.size, min=d.min, max=d.max or 0)
            for d in (s.dims or ())
        ]
        return pb.TensorSpec(
            name=s.name, dtype=dtype_to_pb(s.dtype), dims=dims, shape_known=s.dims is not None
        )

    return pb.ModelSchema(
        inputs=[spec(s) for s in schema.inputs],
        outputs=[spec(s) for s in schema.outputs],
        batched=schema.batched,
        source=schema.source,
    )


def schema_from_pb(msg: pb.ModelSchema) -> ModelSchema | None:
    """A user-given schema, or None when the message is empty."""
    if not msg.inputs:
        return None

    def spec(s: pb.TensorSpec, field: str) -> TensorSpec:
        if not s.name:
            raise InvalidInput(f"{field}: name is required")
        dtype = dtype_from_pb(s.dtype) if s.dtype else None
        if s.dtype and dtype is None:
            raise InvalidInput(f"{field}: unsupported dtype {s.dtype}")
        dims = tuple(
            Dim(size=None, min=d.min, max=d.max or None) if d.size < 0 else Dim(size=d.size) for d in s.dims
        )
        return TensorSpec(s.name, dtype, dims if s.shape_known or s.dims else None)

    return ModelSchema(
        inputs=tuple(spec(s, f"schema.inputs[{i}]") for i, s in enumerate(msg.inputs)),
        outputs=tuple(spec(s, f"schema.outputs[{i}]") for i, s in enumerate(msg.outputs)),
        batched=msg.batched,
        source="user",
    )


def batching_to_pb(config: BatchingConfig) -> pb.BatchingConfig:
    return pb.BatchingConfig(
        max_batch_size=config.max_batch_size,
        max_queue_delay_us=config.max_queue_delay_us,
        max_queue_size=config.max_queue_size,
        default_timeout_us=config.default_timeout_us,
        priority_levels=config.priority_levels,
        preferred_batch_sizes=list(config.preferred_batch_sizes),
        max_rows_per_request=config.max_rows_per_request,
    )


def batching_from_pb(msg: pb.BatchingConfig) -> BatchingConfig | None:
    """A user-given batching config, or None to size one from the schema. Fields
    left at 0 take the defaults."""
    if msg.ByteSize() == 0:
        return None
    defaults = BatchingConfig()
    return BatchingConfig(
        max_batch_size=msg.max_batch_size,
        max_queue_delay_us=msg.max_queue_delay_us,
        max_queue_size=msg.max_queue_size or defaults.max_queue_size,
        default_timeout_us=msg.default_timeout_us,
        priority_levels=msg.priority_levels or defaults.priority_levels,
        preferred_batch_sizes=tuple(msg.preferred_batch_sizes),
        max_rows_per_request=msg.max_rows_per_request,
    )


def constant_to_pb(spec: ConstantSpec) -> pb.ConstantInfo:
    return pb.ConstantInfo(
        fqn=spec.fqn, internal_name=spec.internal_name, dtype=dtype_to_pb(spec.dtype), shape=list(spec.shape)
    )
