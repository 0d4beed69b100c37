"""The per-request fast check in ModelSchema.validate must decide exactly as the
full check: same tensors accepted (in call order), everything else refused."""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pt2serve.loader.errors import InvalidInput
from pt2serve.loader.schema import Dim, ModelSchema, TensorSpec

SCHEMAS = [
    ModelSchema(
        inputs=(
            TensorSpec("x", "float32", (Dim(None, 1, 8), Dim(4))),
            TensorSpec("m", "int64", (Dim(None, 1, 8), Dim(2), Dim(3))),
        ),
        outputs=(TensorSpec("y", "float32", None),),
        batched=True,
    ),
    ModelSchema(  # static batch: rows 1..4, padded by the scheduler
        inputs=(TensorSpec("x", "float32", (Dim(4), Dim(3))),),
        outputs=(TensorSpec("y", "float32", None),),
        batched=True,
    ),
    ModelSchema(
        inputs=(TensorSpec("x", "float16", (Dim(2), Dim(5))),),
        outputs=(TensorSpec("y", "float16", None),),
        batched=False,
    ),
]

DTYPES = [torch.float32, torch.float16, torch.int64, torch.float64]


def full_check_only(schema: ModelSchema) -> ModelSchema:
    slow = dataclasses.replace(schema)
    object.__setattr__(slow, "_fast", None)
    return slow


@st.composite
def requests(draw: st.DrawFn) -> tuple[ModelSchema, dict[str, torch.Tensor], int | None]:
    schema = draw(st.sampled_from(SCHEMAS))
    names = [s.name for s in schema.inputs]
    chosen = draw(st.lists(st.sampled_from([*names, "extra"]), unique=True, min_size=0, max_size=3))
    inputs = {}
    for name in chosen:
        rank = draw(st.integers(0, 4))
        shape = draw(st.lists(st.integers(0, 9), min_size=rank, max_size=rank))
        inputs[name] = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
    # Mostly well-formed requests, so both paths get exercised.
    if draw(st.booleans()):
        rows = draw(st.integers(0, 10))
        for spec in schema.inputs:
            assert spec.dims is not None and spec.dtype is not None
            dims = [d.size or 1 for d in spec.dims]
            if schema.batched:
                dims[0] = rows
            inputs[spec.name] = torch.zeros(dims, dtype=getattr(torch, spec.dtype))
    row_limit = draw(st.sampled_from([None, 2, 8]))
    return schema, inputs, row_limit


@settings(max_examples=400, deadline=None)
@given(requests())
def test_fast_path_decides_like_the_full_check(
    case: tuple[ModelSchema, dict[str, torch.Tensor], int | None],
) -> None:
    schema, inputs, row_limit = case
    assert schema._fast is not None  # every schema above is fully known

    def outcome(s: ModelSchema) -> list[int] | str:
        try:
            return [id(t) for t in s.validate(inputs, row_limit=row_limit)]
        except InvalidInput:
            return "refused"

    assert outcome(schema) == outcome(full_check_only(schema))
