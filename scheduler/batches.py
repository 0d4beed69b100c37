"""The pieces of dynamic batching: queued requests, runner slots, statistics, and
what a runner thread does with a batch (concatenate, pad, run, split: pure
functions of tensors, called off the event loop)."""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from pt2serve.loader.dtypes import AnyTensor, RawTensor, as_raw, join_raw, join_rows, rows_as_raw
from pt2serve.loader.errors import ExecutionFailed, InvalidInput
from pt2serve.scheduler.config import BatchingConfig

log = logging.getLogger(__name__)
J = TypeVar("J", torch.Tensor, RawTensor)
# A batch of at most this many requests, finishing while nothing is queued, is
# answered by its runner thread itself where the callers gave a sink: at low load
# that saves waking the event loop before the answers can leave (docs/
# performance.md, "Seventh round"). Under load the loop is awake anyway, and must
# run to start the next batch; answering from it there keeps the runner free.
EARLY_MAX_REQUESTS = 4


class Runner(Protocol):
    """Something that runs a model on validated inputs in call order."""

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


@dataclass(slots=True)  # not frozen: made for every request
class RunResult:
    # Bytes (RawTensor) as a runner thread cut them from the batch's outputs.
    outputs: list[AnyTensor]
    constants_version: int
    # Already sent to its caller by the runner thread (AnswerSink): the loop only
    # counts it.
    delivered: bool = False


class AnswerSink(Protocol):
    """Where a runner thread sends answers the moment their batch has run, instead of
    handing them to the event loop first (the engine: a front end's socket). Both
    methods run on a runner thread, possibly two at once."""

    def put(self, key: Any, result: RunResult) -> bool:
        """Take one request's answer; False if it cannot (the loop then answers)."""

    def flush(self) -> None:
        """Send what `put` took from this batch."""


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
    # Where the runner thread may send the answer itself, and the request's key there.
    early: tuple[AnswerSink, Any] | None = None
    # Set (under the scheduler's claim lock) once the runner thread has taken charge
    # of the answer: a deadline passing after that no longer expires the request.
    claimed: bool = False
    # The result the runner thread sent (delivered) or tried to.
    answer: RunResult | None = None


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


def check_request(
    config: BatchingConfig,
    model: str,
    batched: bool,
    inputs: Sequence[AnyTensor],
    priority: int,
    timeout_s: float | None,
    deadline: float | None,
    now: float,
) -> tuple[int, float | None]:
    """A request's rows and its deadline (`deadline`, shortened by `timeout_s` or the
    model's default timeout); InvalidInput for a priority or row count the model
    does not take."""
    if not 0 <= priority < config.priority_levels:
        raise InvalidInput(
            f"priority {priority} out of range: model {model!r} has "
            f"{config.priority_levels} levels (0 is highest)"
        )
    timeout = timeout_s if timeout_s is not None else config.default_timeout_s
    if timeout is not None:
        deadline = now + timeout if deadline is None else min(deadline, now + timeout)
    rows = inputs[0].shape[0] if batched else 1
    if rows > config.row_limit:
        raise InvalidInput(
            f"too many rows: {rows}, model {model!r} takes at most {config.row_limit} per request"
        )
    return rows, deadline


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


def answer_early(
    model: str,
    batch: Sequence[PendingRequest],
    results: Sequence[list[AnyTensor]],
    version: int,
    claims: threading.Lock,
    clock: Callable[[], float],
    queued: int,
) -> None:
    """On the runner thread, once `batch` has run, if it is small and nothing is
    `queued` (else the loop is awake anyway): hand each answer that has a sink to
    it, unless its request was withdrawn or its deadline has passed (the loop
    answers those); then flush each sink once. A request is claimed under `claims`
    first, so that the loop cannot expire it while its answer is on the way."""
    if queued or len(batch) > EARLY_MAX_REQUESTS:
        return
    sinks: list[AnswerSink] = []
    now = clock()
    for req, outputs in zip(batch, results, strict=True):
        if req.early is None:
            continue
        with claims:
            if req.future.done() or (req.deadline is not None and req.deadline <= now):
                continue
            req.claimed = True
        sink, key = req.early
        try:
            delivered = sink.put(key, RunResult(outputs, version))
        except Exception:
            log.exception("model %r: an answer could not be sent early", model)
            delivered = False
        req.answer = RunResult(outputs, version, delivered)
        if delivered and sink not in sinks:
            sinks.append(sink)
    for sink in sinks:
        try:
            sink.flush()
        except Exception:  # its connection is gone: nobody is left to answer
            log.exception("model %r: early answers could not be sent", model)


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
