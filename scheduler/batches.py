"""The pieces of dynamic batching: queued requests, runner slots, statistics, and
what a runner thread does with a batch (concatenate, pad, run, split: pure
functions of tensors, called off the event loop)."""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from pt2serve.loader.dtypes import AnyTensor, RawTensor, as_raw, join_raw, join_rows, rows_as_raw
from pt2serve.loader.errors import ExecutionFailed

J = TypeVar("J", torch.Tensor, RawTensor)


class Runner(Protocol):
    """Something that runs a model on validated inputs in call order."""

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


@dataclass(frozen=True, slots=True)
class RunResult:
    # Bytes (RawTensor) as a runner thread cut them from the batch's outputs.
    outputs: list[AnyTensor]
    constants_version: int


class State(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3


@dataclass(eq=False, slots=True)
class PendingRequest:
    # Bytes as received (RawTensor) until a runner thread joins the batch.
    inputs: list[AnyTensor]
    rows: int
    bucket: tuple[object, ...]
    priority: int
    deadline: float | None
    future: asyncio.Future[RunResult]
    enqueued_at: float
    state: State = State.QUEUED
    on_done: Callable[[asyncio.Future[RunResult]], None] | None = None


@dataclass(eq=False, slots=True)
class RunnerSlot:
    """One runner and how many batches it may run at once (its runner count)."""

    runner: Runner
    capacity: int = 1
    in_flight: int = 0
    label: str = ""
    batches: int = 0


@dataclass(slots=True)
class SchedulerStats:
    """Cumulative counters since the model was loaded."""

    batches: int = 0
    rows: int = 0
    requests: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    # Summed over requests (queue) and over batches (compute).
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    # Wall-clock time the last batch finished (0: none yet).
    last_batch_at: float = 0.0

    def record(self, rows: int, requests: int, queue_seconds: float, compute_seconds: float) -> None:
        """Count one finished batch (once, also when its members are then retried alone)."""
        self.batches += 1
        self.requests += requests
        self.rows += rows
        self.batch_sizes[rows] += 1
        self.queue_seconds += queue_seconds
        self.compute_seconds += compute_seconds
        self.last_batch_at = time.time()


def resolve(req: PendingRequest, result: RunResult | BaseException) -> None:
    req.state = State.DONE
    if req.future.done():
        return
    if isinstance(result, BaseException):
        req.future.set_exception(result)
    else:
        req.future.set_result(result)


def run_batch(
    runner: Runner,
    inputs: Sequence[Sequence[AnyTensor]],
    rows: Sequence[int],
    *,
    batched: bool,
    pad_to: int | None,
) -> list[list[AnyTensor]]:
    """Run the requests' `inputs` (each in call order, `rows[i]` rows) as one batch;
    returns each request's outputs, as RawTensors over the batch outputs' bytes. A
    package compiled at a static batch size (`pad_to`) gets zero rows appended, and
    its outputs are cut back."""
    if len(inputs) == 1:
        joined = [t.tensor() if isinstance(t, RawTensor) else t for t in inputs[0]]
    else:
        joined = [_stack(parts, join_rows) for parts in zip(*inputs, strict=True)]
    total = sum(rows)
    padded = total
    if pad_to is not None and total < pad_to:
        padded = pad_to
        joined = [torch.cat([t, t.new_zeros((padded - total, *t.shape[1:]))]) for t in joined]
    outputs = runner.run(joined)
    if not batched:
        return [[as_raw(out) for out in outputs]]
    for i, out in enumerate(outputs):
        if out.dim() == 0 or out.shape[0] != padded:
            raise ExecutionFailed(f"output {i} has shape {list(out.shape)}; expected {padded} rows on dim 0")
    if padded != total:
        outputs = [out[:total] for out in outputs]
    split = [rows_as_raw(out, rows) for out in outputs]
    return [list(parts) for parts in zip(*split, strict=True)]


def _stack(parts: Sequence[AnyTensor], join: Callable[[list[RawTensor]], J]) -> J | torch.Tensor:
    """`parts` stacked on dim 0: by `join` when all are bytes (the usual case, one copy
    of them), else by torch."""
    raw = [p for p in parts if isinstance(p, RawTensor)]
    if len(raw) == len(parts):
        return join(raw)
    return torch.cat([p.tensor() if isinstance(p, RawTensor) else p for p in parts])


def split_rows(inputs: Sequence[AnyTensor], rows: int, step: int) -> list[tuple[list[AnyTensor], int]]:
    """A request of `rows` rows as parts of at most `step` rows: (inputs, rows) each."""
    return [
        ([_rows(t, start, start + step) for t in inputs], min(step, rows - start))
        for start in range(0, rows, step)
    ]


def _rows(tensor: AnyTensor, start: int, stop: int) -> AnyTensor:
    return tensor.row_slice(start, stop) if isinstance(tensor, RawTensor) else tensor[start:stop]


async def reassemble(parts: Sequence[asyncio.Future[RunResult]]) -> RunResult:
    """The outputs of a split request, joined in row order; if one part fails the
    others are withdrawn."""
    try:
        results = await asyncio.gather(*parts)
    except BaseException:
        for part in parts:
            part.cancel()
        raise
    outputs = [_stack(chunk, join_raw) for chunk in zip(*(r.outputs for r in results), strict=True)]
    return RunResult(outputs, max(r.constants_version for r in results))
