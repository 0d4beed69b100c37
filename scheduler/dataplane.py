"""`DataPlane`: inference for every protocol. A protocol adapter hands it a model
name and a decoder of its request; the data plane validates, queues, names the
outputs and counts every request exactly once, however it ends (answered, refused
before queueing, failed, cancelled)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from pt2serve.loader.dtypes import AnyTensor, TensorLike
from pt2serve.loader.errors import ErrorKind, ExecutionFailed, InvalidInput, Pt2ServeError, shown
from pt2serve.loader.schema import ModelSchema
from pt2serve.scheduler.batches import AnswerSink, RunResult
from pt2serve.scheduler.registry import ModelRegistry


@dataclass(slots=True)  # not frozen (nor the result): made for every request
class InferenceOptions:
    # 0 is the highest priority.
    priority: int = 0
    # Seconds from now; can only shorten `deadline`.
    timeout_s: float | None = None
    # Absolute, on time.monotonic (the caller's gRPC deadline).
    deadline: float | None = None
    # The outputs to return (empty: all).
    output_names: tuple[str, ...] = ()


T = TypeVar("T", bound=TensorLike)


@dataclass(slots=True)
class InferenceResult:
    outputs: dict[str, AnyTensor]
    constants_version: int
    # Already sent by a runner thread to the caller's AnswerSink.
    delivered: bool = False


# Turns a protocol's request into inputs by name and options; raises Pt2ServeError
# for a request that cannot be decoded (counted as refused).
Decode = Callable[[], tuple[Mapping[str, AnyTensor], InferenceOptions]]
# Hears how a submitted request ended, unless its caller cancelled it.
OnDone = Callable[[InferenceResult | BaseException], None]


class Withdrawable(Protocol):
    """A submitted request, as a stream holds it until its answer."""

    @property
    def future(self) -> asyncio.Future[Any]:
        """Done once the request has ended (answered, failed or withdrawn)."""

    def cancel(self) -> None:
        """Withdraw the request unless it is already running."""


class InferencePlane(Protocol):
    """What a protocol adapter calls for inference: `DataPlane` in this process, or
    a front end's link to the engine process (service/frontend.py)."""

    async def infer(self, model: str, decode: Decode) -> InferenceResult: ...

    def submit(self, model: str, decode: Decode, on_done: OnDone | None = None) -> Withdrawable: ...


def accept(
    schema: ModelSchema,
    model: str,
    inputs: Mapping[str, T],
    output_names: Sequence[str],
    row_limit: int,
) -> list[T]:
    """A request's inputs in call order, once they match the schema and the outputs
    it asks for (`output_names`, empty: all) exist; InvalidInput naming the field
    otherwise."""
    unknown = [n for n in output_names if n not in schema.output_names]
    if unknown:
        raise InvalidInput(
            f"unknown output {shown(unknown[0])}; model {shown(model)} has outputs: "
            f"{', '.join(schema.output_names)}"
        )
    return schema.validate(inputs, row_limit=row_limit)


class Ticket:
    """A queued request. `cancel()` withdraws it unless it is already running."""

    __slots__ = ("future", "key", "_model", "_names", "_wanted")

    def __init__(self, model: str, names: tuple[str, ...], wanted: tuple[str, ...], key: Any = None) -> None:
        self._model = model
        self._names = names
        self._wanted = frozenset(wanted)
        # The caller's name for the request (the engine: its id on the wire).
        self.key = key
        self.future: asyncio.Future[RunResult]

    def cancel(self) -> None:
        self.future.cancel()

    def outcome(self) -> InferenceResult | BaseException:
        """The named outputs, or the request's error. Call once `future` is done."""
        error = self.future.exception()
        if error is not None:
            return error
        return self.named(self.future.result())

    def named(self, result: RunResult) -> InferenceResult | ExecutionFailed:
        """The requested outputs of `result` by name (any thread: it reads only what
        the ticket was made with)."""
        return named_outputs(self._model, self._names, self._wanted, result)


def named_outputs(
    model: str, names: Sequence[str], wanted: Collection[str], result: RunResult
) -> InferenceResult | ExecutionFailed:
    """The outputs of `result` that a request asked for (`wanted`, empty: all), by
    their schema `names`."""
    if len(result.outputs) != len(names):
        return ExecutionFailed(
            f"model {model!r} returned {len(result.outputs)} outputs, its schema names {len(names)}"
        )
    pairs = zip(names, result.outputs, strict=True)
    outputs = {n: t for n, t in pairs if n in wanted} if wanted else dict(pairs)
    return InferenceResult(outputs, result.constants_version, result.delivered)


class DataPlane:
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        # Requests queued, and of those: answered (any outcome) and answered OK.
        self.accepted = 0
        self.answered = 0
        self.succeeded = 0

    async def infer(self, model: str, decode: Decode) -> InferenceResult:
        """Run one request; raises its error (a Pt2ServeError for every expected one)."""
        ticket = self.submit(model, decode)
        try:
            await ticket.future  # cancelling the caller withdraws the request
        except Exception:
            pass  # the outcome carries it
        outcome = ticket.outcome()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def submit(
        self,
        model: str,
        decode: Decode,
        on_done: OnDone | None = None,
        sink: AnswerSink | None = None,
        key: Any = None,
    ) -> Ticket:
        """Decode, validate and queue a request without waiting for it (streams).

        Raises at once for a request that cannot be accepted. `on_done` runs on the
        loop once the request has ended, after it is counted, unless it was cancelled:
        one callback per request, not a second one on the future.

        With a `sink`, a runner thread may answer first: `sink.put(ticket, result)`
        with the ticket (its `key` is `key`) and the raw result (`ticket.named`
        names it); `on_done` then gets the outcome with `delivered` set.
        """
        started = time.monotonic()
        try:
            decoded, options = decode()
            loaded = self._registry.get(model)
            schema = loaded.schema
            # Inputs stay as received (RawTensor: bytes) until a runner joins the batch.
            ordered = accept(schema, model, decoded, options.output_names, loaded.batching.row_limit)
            ticket = Ticket(model, schema.output_names, options.output_names, key)

            def done(future: asyncio.Future[RunResult]) -> None:
                try:
                    elapsed = time.monotonic() - started
                    if future.cancelled():
                        self.answered += 1
                        self._registry.telemetry.request_cancelled(model, elapsed)
                    else:
                        self._count(model, elapsed, future.exception())
                finally:
                    if on_done is not None and not future.cancelled():
                        on_done(ticket.outcome())

            ticket.future = loaded.scheduler.enqueue(
                ordered,
                priority=options.priority,
                timeout_s=options.timeout_s,
                deadline=options.deadline,
                on_done=done,
                early=None if sink is None else (sink, ticket),
            )
        except Pt2ServeError as exc:
            telemetry = self._registry.telemetry
            telemetry.request_finished(self._registry.metric_label(model), exc.kind, 0.0)
            raise
        self.accepted += 1
        return ticket

    def ran_alone(self, model: str, elapsed: float, error: BaseException | None) -> None:
        """Count a request that was run the moment it arrived, outside the queue
        (the engine's intake: ModelScheduler.run_alone), and answered `error` or not."""
        self.accepted += 1
        self._count(model, elapsed, error)

    def _count(self, name: str, elapsed: float, error: BaseException | None) -> None:
        telemetry = self._registry.telemetry
        self.answered += 1
        if error is None:
            self.succeeded += 1
        model = self._registry.find(name)
        if model is not None:
            if error is None:
                model.requests.succeeded += 1
                model.requests.succeeded_seconds += elapsed
            else:
                model.requests.failed += 1
                model.requests.failed_seconds += elapsed
        kind = (
            None
            if error is None
            else (error.kind if isinstance(error, Pt2ServeError) else ErrorKind.INTERNAL)
        )
        telemetry.request_finished(name, kind, elapsed)
