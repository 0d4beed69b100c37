"""A model's serving schema: what each input must look like before the runtime sees it.

The AOTI runtime checks neither dtypes nor shapes unless AOTI_RUNTIME_CHECK_INPUTS=1,
so every request is validated here. The schema comes from the package metadata
(`pt2serve build` stores it under METADATA_KEY), from the compiled wrapper source
(`derive_from_wrapper`), or from the user.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, TypeVar

import torch

from pt2serve.loader.dtypes import BY_TORCH, DTYPES, TensorLike
from pt2serve.loader.errors import InvalidInput, PackageError, shown

METADATA_KEY = "pt2serve.schema"
T = TypeVar("T", bound=TensorLike)


@dataclass(frozen=True, slots=True)
class Dim:
    """One dimension: a fixed `size`, or dynamic (size None) within [min, max]."""

    size: int | None
    min: int = 0
    max: int | None = None

    def admits(self, value: int) -> bool:
        if self.size is not None:
            return value == self.size
        return value >= self.min and (self.max is None or value <= self.max)

    def describe(self) -> str:
        if self.size is not None:
            return str(self.size)
        upper = "" if self.max is None else str(self.max)
        return f"{self.min}..{upper}"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str | None
    dims: tuple[Dim, ...] | None

    def describe(self) -> str:
        shape = "?" if self.dims is None else "[" + ", ".join(d.describe() for d in self.dims) + "]"
        return f"{self.name}: {self.dtype or '?'}{shape}"


@dataclass(frozen=True, slots=True)
class ModelSchema:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batched: bool
    source: str = "package"
    # Derived once (validate runs for every request): each input's name, dtype and
    # fixed non-batch dims, or None when some input is not fully known.
    _fast: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...] | None = dataclass_field(
        init=False, repr=False, compare=False, default=None
    )
    _input_names: tuple[str, ...] = dataclass_field(init=False, repr=False, compare=False, default=())
    _output_names: tuple[str, ...] = dataclass_field(init=False, repr=False, compare=False, default=())
    _rows: tuple[int, int | None] = dataclass_field(init=False, repr=False, compare=False, default=(0, None))

    def __post_init__(self) -> None:
        object.__setattr__(self, "_input_names", tuple(s.name for s in self.inputs))
        object.__setattr__(self, "_output_names", tuple(s.name for s in self.outputs))
        object.__setattr__(self, "_rows", (self.min_rows, self.max_rows))
        fast = []
        for spec in self.inputs:
            if spec.dtype is None or not spec.dims:
                return
            tail = spec.dims[1:] if self.batched else spec.dims
            if any(d.size is None for d in tail):
                return
            fast.append((spec.name, DTYPES[spec.dtype], tuple(d.size for d in tail if d.size is not None)))
        object.__setattr__(self, "_fast", tuple(fast))

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._output_names

    @property
    def static_batch(self) -> int | None:
        """The compiled batch size of a batched model whose dim 0 is fixed, else None.

        Requests to such a model carry 1..static_batch rows; the scheduler pads
        each batch up to the compiled size and drops the padding from the outputs.
        """
        if not self.batched:
            return None
        sizes = {s.dims[0].size for s in self.inputs if s.dims}
        if len(sizes) == 1 and (size := sizes.pop()) is not None:
            return size
        return None

    @property
    def max_rows(self) -> int | None:
        """The most rows one run takes (the tightest bound on dim 0), or None."""
        if not self.batched:
            return None
        if (static := self.static_batch) is not None:
            return static
        bounds = [s.dims[0].max for s in self.inputs if s.dims and s.dims[0].max is not None]
        return min(bounds) if bounds else None

    @property
    def min_rows(self) -> int:
        if not self.batched:
            return 0
        if self.static_batch is not None:
            return 1
        return max((s.dims[0].min for s in self.inputs if s.dims), default=1)

    def validate(self, inputs: Mapping[str, T], *, row_limit: int | None = None) -> list[T]:
        """Check `inputs` against the schema; return them in call order.

        `row_limit` replaces the package's bound on dim 0 of a batched model (the
        scheduler splits requests larger than one batch). Raises InvalidInput naming
        the offending input and what was expected.
        """
        accepted = self._validate_fast(inputs, row_limit)
        if accepted is not None:
            return accepted
        batch_dim = None
        if self.batched:
            batch_dim = Dim(None, self.min_rows, self.max_rows if row_limit is None else row_limit)
        unknown = sorted(set(inputs) - set(self.input_names))
        if unknown:
            raise InvalidInput(
                f"unknown input {shown(unknown[0])}; expected inputs: {', '.join(self.input_names)}"
            )
        ordered: list[T] = []
        rows: dict[str, int] = {}
        for spec in self.inputs:
            tensor = inputs.get(spec.name)
            if tensor is None:
                raise InvalidInput(f"missing input {spec.name!r} ({spec.describe()})")
            _check_tensor(spec, tensor, batch_dim)
            if self.batched:
                rows[spec.name] = tensor.shape[0]
            ordered.append(tensor)
        if len(set(rows.values())) > 1:
            listed = ", ".join(f"{n} has {r}" for n, r in rows.items())
            raise InvalidInput(f"inputs disagree on the batch dimension (dim 0): {listed}")
        return ordered

    def _validate_fast(self, inputs: Mapping[str, T], row_limit: int | None) -> list[T] | None:
        """The common case in a few comparisons: every input present with its dtype
        and fixed dims. None sends the request through the full check, which names
        what is wrong (or accepts what this one cannot decide)."""
        if self._fast is None or len(inputs) != len(self._fast):
            return None
        ordered = []
        rows = None
        for name, dtype, tail in self._fast:
            tensor = inputs.get(name)
            if tensor is None or tensor.dtype != dtype:
                return None
            shape = tensor.shape
            if self.batched:
                if len(shape) != len(tail) + 1 or shape[1:] != tail:
                    return None
                if rows is None:
                    rows = shape[0]
                elif shape[0] != rows:
                    return None
            elif shape != tail:
                return None
            ordered.append(tensor)
        if rows is not None:
            low, high = self._rows
            limit = high if row_limit is None else row_limit
            if rows < low or (limit is not None and rows > limit):
                return None
        return ordered

    def warmup_inputs(self) -> list[torch.Tensor] | None:
        """Zeros of the smallest shape every input admits, in call order (a warm-up
        batch); None when an input's dtype or rank is unknown."""
        inputs = []
        for spec in self.inputs:
            if spec.dtype is None or spec.dims is None:
                return None
            shape = [d.size if d.size is not None else max(d.min, 1) for d in spec.dims]
            if self.batched and shape:
                shape[0] = self.static_batch or max(self.min_rows, 1)
            inputs.append(torch.zeros(shape, dtype=DTYPES[spec.dtype]))
        return inputs

    def with_outputs_of(self, outputs: Sequence[torch.Tensor]) -> ModelSchema:
        """This schema with each output's unknown dtype and shape taken from a warm-up
        run's `outputs`. A dim that may follow a dynamic input dim stays dynamic."""
        if len(outputs) != len(self.outputs):
            raise PackageError(
                f"the model returned {len(outputs)} outputs, its schema names {len(self.outputs)}"
            )
        fixed_tail = all(
            d.size is not None for s in self.inputs for d in (s.dims or ())[1 if self.batched else 0 :]
        )
        filled = []
        for spec, tensor in zip(self.outputs, outputs, strict=True):
            dtype = spec.dtype or _name_or_none(tensor.dtype)
            dims = spec.dims
            if dims is None:
                dims = tuple(Dim(size) if fixed_tail else Dim(None) for size in tensor.shape)
                if self.batched and dims and self.static_batch is None:
                    dims = (Dim(None, self.min_rows, self.max_rows), *dims[1:])
            filled.append(TensorSpec(spec.name, dtype, dims))
        return ModelSchema(self.inputs, tuple(filled), self.batched, self.source)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "batched": self.batched,
                "inputs": [_spec_to_dict(s) for s in self.inputs],
                "outputs": [_spec_to_dict(s) for s in self.outputs],
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "package") -> ModelSchema:
        try:
            raw = json.loads(text)
            return cls(
                inputs=tuple(_spec_from_dict(d) for d in raw["inputs"]),
                outputs=tuple(_spec_from_dict(d) for d in raw["outputs"]),
                batched=bool(raw["batched"]),
                source=source,
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"malformed serving schema: {exc}") from exc


def _name_or_none(dtype: torch.dtype) -> str | None:
    found = BY_TORCH.get(dtype)
    return None if found is None else found.name


def _check_tensor(spec: TensorSpec, tensor: TensorLike, batch_dim: Dim | None) -> None:
    if spec.dtype is not None and _name_or_none(tensor.dtype) != spec.dtype:
        got = _name_or_none(tensor.dtype) or str(tensor.dtype)
        raise InvalidInput(f"input {spec.name!r}: dtype {got}, expected {spec.dtype}")
    if spec.dims is None:
        return
    shape = tuple(tensor.shape)
    dims = spec.dims if batch_dim is None or not spec.dims else (batch_dim, *spec.dims[1:])

    def expected() -> str:  # only for messages: this runs for every request
        return "[" + ", ".join(d.describe() for d in dims) + "]"

    if len(shape) != len(dims):
        raise InvalidInput(
            f"input {spec.name!r}: rank {len(shape)} (shape {list(shape)}), "
            f"expected rank {len(dims)} (shape {expected()})"
        )
    for i, (value, dim) in enumerate(zip(shape, dims, strict=True)):
        if i == 0 and batch_dim is not None and batch_dim.max is not None and value > batch_dim.max:
            raise InvalidInput(
                f"input {spec.name!r}: too many rows: {value} (dim 0), at most {batch_dim.max} per request"
            )
        if not dim.admits(value):
            raise InvalidInput(
                f"input {spec.name!r}: dim {i} is {value}, expected {dim.describe()} "
                f"(shape {list(shape)}, expected {expected()})"
            )


def _spec_to_dict(spec: TensorSpec) -> dict[str, Any]:
    dims = None
    if spec.dims is not None:
        dims = [{"size": d.size, "min": d.min, "max": d.max} for d in spec.dims]
    return {"name": spec.name, "dtype": spec.dtype, "dims": dims}


def _spec_from_dict(raw: dict[str, Any]) -> TensorSpec:
    dtype = raw.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}")
    dims = raw.get("dims")
    return TensorSpec(
        name=str(raw["name"]),
        dtype=dtype,
        dims=None
        if dims is None
        else tuple(Dim(size=d["size"], min=int(d.get("min", 0)), max=d.get("max")) for d in dims),
    )


# ------------------------------------------------------------------ derivation
# AOTInductor writes, for each input, a check function into the wrapper source
# (used when AOTI_RUNTIME_CHECK_INPUTS=1). Those checks are the compiled model's
# own statement of what it accepts, so a schema read from them is exact for dtype,
# rank, fixed sizes and dynamic bounds.

_CHECK_FN = re.compile(r"static void check_input_(\d+)\((.*?)\n\}\n", re.DOTALL)
_EXPECTED_DTYPE = re.compile(r"_expected_dtype = aoti_torch_dtype_(\w+)\(\);")
_FIXED = re.compile(r"if \((\d+) != \w+_size\[(\d+)\]\)")
_MIN = re.compile(r"if \(\w+_size\[(\d+)\] < (\d+)\)")
_MAX = re.compile(r"if \(\w+_size\[(\d+)\] > (\d+)\)")
_STRIDE = re.compile(r"\w+_stride\[(\d+)\]")
_OUTPUT_NAME = re.compile(r"outputs_info_\[(\d+)\]\.name")


def derive_from_wrapper(source: str) -> ModelSchema:
    """Read the serving schema from an AOTInductor wrapper .cpp's input checks."""
    inputs: list[TensorSpec] = []
    for index, body in _CHECK_FN.findall(source):
        dtype = _EXPECTED_DTYPE.search(body)
        fixed = {int(i): int(v) for v, i in _FIXED.findall(body)}
        lows = {int(i): int(v) for i, v in _MIN.findall(body)}
        highs = {int(i): int(v) for i, v in _MAX.findall(body)}
        seen = set(fixed) | set(lows) | set(highs) | {int(i) for i in _STRIDE.findall(body)}
        rank = max(seen) + 1 if seen else 0
        dims = tuple(
            Dim(size=fixed[i]) if i in fixed else Dim(None, lows.get(i, 0), highs.get(i)) for i in range(rank)
        )
        inputs.append(TensorSpec(f"input{index}", dtype.group(1) if dtype else None, dims))
    if not inputs and "check_input_" not in source and "inputs_info_" in source:
        raise PackageError("the wrapper source has no input checks to derive a schema from")
    n_out = len(set(_OUTPUT_NAME.findall(source)))
    outputs = tuple(TensorSpec(f"output{i}", None, None) for i in range(n_out))
    batched = bool(inputs) and all(s.dims and s.dims[0].size is None for s in inputs)
    if batched:
        # The runtime batches fine from one row; export records 2 as the low
        # bound only because it specialises sizes 0 and 1.
        inputs = [_relax_low_bound(s) for s in inputs]
    return ModelSchema(tuple(inputs), outputs, batched, source="derived")


def _relax_low_bound(spec: TensorSpec) -> TensorSpec:
    assert spec.dims is not None
    first = spec.dims[0]
    return TensorSpec(spec.name, spec.dtype, (Dim(None, min(first.min, 1), first.max), *spec.dims[1:]))


@dataclass(frozen=True, slots=True)
class ConstantSpec:
    """A model constant (weight or buffer) as the compiled model lays it out."""

    fqn: str
    internal_name: str
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    from_folded: bool
    # The runtime's ConstantType: "Parameter", "Buffer", "TensorConstant" ("" if unknown).
    kind: str = ""

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def refilled_when_staging(self) -> bool:
        """Whether every staging call (`use_inactive`) that leaves this constant out
        copies it from the active buffer (model_container.h): buffers, tensor
        constants and empty parameters. Staging such a constant on its own is undone
        by the next staging call that omits it. Unknown kinds count as refilled."""
        return not (self.kind == "Parameter" and self.numel() > 0)


_CONST_FIELD = re.compile(r"constants_info_\[(\d+)\]\.(\w+) = (.*?);\n")
_CONST_TYPE = re.compile(r"ConstantType::(\w+)")


def constants_from_wrapper(source: str) -> dict[str, ConstantSpec]:
    """Constants by FQN, read from the wrapper's constants_info_ table."""
    fields: dict[int, dict[str, str]] = {}
    for index, field, value in _CONST_FIELD.findall(source):
        fields.setdefault(int(index), {})[field] = value.strip()
    specs: dict[str, ConstantSpec] = {}
    for raw in fields.values():
        dtype = raw.get("dtype", "").removeprefix("cached_torch_dtype_")
        specs[_unquote(raw["original_fqn"])] = ConstantSpec(
            fqn=_unquote(raw["original_fqn"]),
            internal_name=_unquote(raw["name"]),
            dtype=dtype,
            shape=_int_list(raw.get("shape", "{}")),
            stride=_int_list(raw.get("stride", "{}")),
            from_folded=raw.get("from_folded") == "true",
            kind=_constant_kind(raw.get("type", "")),
        )
    return specs


def _constant_kind(value: str) -> str:
    match = _CONST_TYPE.search(value)
    return match.group(1) if match else ""


def _unquote(value: str) -> str:
    return value.strip().strip('"')


def _int_list(value: str) -> tuple[int, ...]:
    inner = value.strip().lstrip("{").rstrip("}")
    return tuple(int(v.strip().rstrip("L")) for v in inner.split(",") if v.strip())
