"""Dynamic batching for one model: queue, form batches, dispatch to runners.

Invariants (the tests check each one):
- every submitted request's future is resolved exactly once: with its outputs, or
  with Overloaded, Expired, Unavailable or ExecutionFailed; a caller that is
  cancelled leaves no work behind;
- a batch holds at most `max_batch_size` rows and never mixes shape buckets
  (requests batch together only when every non-batch dim and dtype matches);
- a request that is cancelled or whose deadline passed while queued never runs;
- when a runner is idle and work is queued, a batch is dispatched at once, unless
  the user asked for `max_queue_delay` to grow batches;
- the model runs in worker threads (scheduler/workers.py), never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import torch

from pt2serve.loader.errors import ExecutionFailed, Expired, InvalidInput, Overloaded, Unavailable
from pt2serve.scheduler.telemetry import NoTelemetry, Telemetry
from pt2serve.scheduler.workers import WorkerPool

log = logging.getLogger(__name__)
T = TypeVar("T")


class Runner(Protocol):
    """Something that runs a model on validated inputs in call order."""

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    # Rows per batch; 0 fits it to the package (see manager.fit_batching).
    max_batch_size: int = 0
    # How long an idle runner waits for a fuller batch (0: dispatch at once).
    max_queue_delay_s: float = 0.0
    # Requests waiting in the queue, all priorities together.
    max_queue_size: int = 1024
    # Applied when a request sets no timeout (None: the caller's deadline only).
    default_timeout_s: float | None = None
    priority_levels: int = 2
    # With more rows waiting than a batch holds, cut batches at these sizes.
    preferred_batch_sizes: tuple[int, ...] = ()
    # A request with more rows than this is refused; above max_batch_size it is
    # split into several batches and reassembled.
    max_rows_per_request: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise InvalidInput(f"max_batch_size must not be negative, got {self.max_batch_size}")
        if self.max_queue_size < 1:
            raise InvalidInput(f"max_queue_size must be at least 1, got {self.max_queue_size}")
        if self.priority_levels < 1:
            raise InvalidInput(f"priority_levels must be at least 1, got {self.priority_levels}")
        if self.max_queue_delay_s < 0:
            raise InvalidInput("max_queue_delay must not be negative")
        if any(s < 1 or s > (self.max_batch_size or s) for s in self.preferred_batch_sizes):
            raise InvalidInput("preferred_batch_sizes must lie in 1..max_batch_size")

    @property
    def row_limit(self) -> int:
        return self.max_rows_per_request or self.max_batch_size


@dataclass(frozen=True, slots=True)
class RunResult:
    outputs: list[torch.Tensor]
    constants_version: int


class _State(enum.Enum):
    QUEUED = 1
    RUNNING = 2
    DONE = 3


@dataclass(eq=False, slots=True)
class PendingRequest:
    inputs: list[torch.Tensor]
    rows: int
    bucket: tuple[object, ...]
    priority: int
    deadline: float | None
    future: asyncio.Future[RunResult]
    enqueued_at: float
    state: _State = _State.QUEUED
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


def _resolve(req: PendingRequest, result: RunResult | BaseException) -> None:
    req.state = _State.DONE
    if req.future.done():
        return
    if isinstance(result, BaseException):
        req.future.set_exception(result)
    else:
        req.future.set_result(result)


class ModelScheduler:
    """Batches one model's requests across its runner slots."""

    def __init__(
        self,
        name: str,
        slots: Sequence[RunnerSlot],
        config: BatchingConfig,
        *,
        batched: bool,
        pad_to: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        telemetry: Telemetry | None = None,
    ) -> None:
        if not slots:
            raise ValueError("a scheduler needs at least one runner slot")
        if config.max_batch_size < 1:
            raise ValueError("fit max_batch_size to the model before scheduling")
        self.name = name
        self.config = config
        self.batched = batched
        # A package compiled at a static batch size runs every batch at that size.
        self.pad_to = pad_to
        self._telemetry: Telemetry = telemetry or NoTelemetry()
        self.constants_version = 0
        self.stats = SchedulerStats()
        self._slots = list(slots)
        self._clock = clock
        self._queues: list[collections.deque[PendingRequest]] = [
            collections.deque() for _ in range(config.priority_levels)
        ]
        self._queued = 0
        self._in_flight = 0
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._paused = 0
        self._exclusive_lock = asyncio.Lock()
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._capacity = sum(s.capacity for s in self._slots)
        self._workers = WorkerPool(self._capacity, f"pt2serve-{name}")

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._workers.start(asyncio.get_running_loop())

    async def close(self, grace_s: float = 0.0) -> None:
        """Refuse new requests, let queued work finish within `grace_s`, fail the rest
        with Unavailable, wait for running batches, and stop the threads."""
        self._closing = True
        deadline = self._clock() + grace_s
        while (self._queued or self._in_flight) and self._clock() < deadline:
            self._pump()
            await asyncio.sleep(min(0.01, max(0.0, deadline - self._clock())))
        for queue in self._queues:
            while queue:
                req = queue.popleft()
                if req.state is _State.QUEUED:
                    self._queued -= 1
                    _resolve(req, Unavailable(f"model {self.name!r} is shutting down"))
        await self._idle.wait()  # running batches resolve their own requests
        if self._timer is not None:
            self._timer.cancel()
        self._workers.close()

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def batches_in_flight(self) -> int:
        return self._in_flight

    # --------------------------------------------------------------- submit
    async def submit(
        self,
        inputs: list[torch.Tensor],
        *,
        priority: int = 0,
        timeout_s: float | None = None,
        deadline: float | None = None,
    ) -> RunResult:
        """Queue validated inputs (call order) and wait for their outputs."""
        return await self.enqueue(inputs, priority=priority, timeout_s=timeout_s, deadline=deadline)

    def enqueue(
        self,
        inputs: list[torch.Tensor],
        *,
        priority: int = 0,
        timeout_s: float | None = None,
        deadline: float | None = None,
        on_done: Callable[[asyncio.Future[RunResult]], None] | None = None,
    ) -> asyncio.Future[RunResult]:
        """Queue validated inputs (call order); the future resolves with their outputs.

        `deadline` is absolute on this scheduler's clock (from the gRPC deadline);
        `timeout_s` (or the model's default timeout) can only shorten it.
        Cancelling the future withdraws a request that has not started running.
        Raises at once (nothing queued) when the request cannot be accepted.
        `on_done(future)` runs on the loop once the future is done: the same as a
        done-callback, but without scheduling a second callback per request.
        """
        if self._closing:
            raise Unavailable(f"model {self.name!r} is shutting down")
        if not 0 <= priority < self.config.priority_levels:
            raise InvalidInput(
                f"priority {priority} out of range: model {self.name!r} has "
                f"{self.config.priority_levels} levels (0 is highest)"
            )
        now = self._clock()
        timeout = timeout_s if timeout_s is not None else self.config.default_timeout_s
        if timeout is not None:
            deadline = now + timeout if deadline is None else min(deadline, now + timeout)
        rows = inputs[0].shape[0] if self.batched else 1
        if rows > self.config.row_limit:
            raise InvalidInput(
                f"too many rows: {rows}, model {self.name!r} takes at most "
                f"{self.config.row_limit} per request"
            )
        if rows > self.config.max_batch_size:
            step = self.config.max_batch_size
            if self._queued + -(-rows // step) > self.config.max_queue_size:
                raise Overloaded(
                    f"model {self.name!r}: queue full ({self.config.max_queue_size} requests waiting)"
                )
            parts = [
                self._enqueue_one(
                    [t[start : start + step] for t in inputs],
                    min(step, rows - start),
                    priority,
                    deadline,
                    now,
                )
                for start in range(0, rows, step)
            ]
            whole = asyncio.ensure_future(self._reassemble(parts))
            if on_done is not None:
                whole.add_done_callback(on_done)
            return whole
        return self._enqueue_one(inputs, rows, priority, deadline, now, on_done)

    @staticmethod
    async def _reassemble(parts: list[asyncio.Future[RunResult]]) -> RunResult:
        try:
            results = await asyncio.gather(*parts)
        except BaseException:
            for part in parts:
                part.cancel()
            raise
        outputs = [torch.cat(chunk) for chunk in zip(*(r.outputs for r in results), strict=True)]
        return RunResult(outputs, max(r.constants_version for r in results))

    def _enqueue_one(
        self,
        inputs: list[torch.Tensor],
        rows: int,
        priority: int,
        deadline: float | None,
        now: float,
        on_done: Callable[[asyncio.Future[RunResult]], None] | None = None,
    ) -> asyncio.Future[RunResult]:
        if self._queued >= self.config.max_queue_size:
            raise Overloaded(
                f"model {self.name!r}: queue full ({self.config.max_queue_size} requests waiting)"
            )
        if deadline is not None and deadline <= now:
            raise Expired(f"model {self.name!r}: deadline passed before the request was queued")
        bucket = tuple((tuple(t.shape[1:]) if self.batched else tuple(t.shape), t.dtype) for t in inputs)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RunResult] = loop.create_future()
        req = PendingRequest(inputs, rows, bucket, priority, deadline, future, now, on_done=on_done)
        self._queues[priority].append(req)
        self._queued += 1
        timer = None if deadline is None else loop.call_later(deadline - now, self._expire, req)
        future.add_done_callback(functools.partial(self._settled, req, timer))
        self._pump()
        return future

    def _settled(
        self, req: PendingRequest, timer: asyncio.TimerHandle | None, future: asyncio.Future[RunResult]
    ) -> None:
        if timer is not None:
            timer.cancel()
        if future.cancelled():
            # The caller went away (cancelled RPC, closed stream): a queued request
            # is withdrawn and never runs; a running one finishes for its batch.
            self._withdraw(req, None)
        if req.on_done is not None:
            req.on_done(future)

    def _expire(self, req: PendingRequest) -> None:
        if req.state is _State.QUEUED:
            self._withdraw(req, Expired(f"model {self.name!r}: deadline exceeded while queued"))
        elif req.state is _State.RUNNING:
            # The caller's deadline has passed, so its answer is dropped; the batch
            # still completes for the others.
            _resolve(req, Expired(f"model {self.name!r}: deadline exceeded while running"))

    def _withdraw(self, req: PendingRequest, error: BaseException | None) -> None:
        """Take a queued request out of consideration (lazily: the dispatcher skips it)."""
        if req.state is not _State.QUEUED:
            return
        self._queued -= 1
        req.state = _State.DONE
        if error is not None:
            _resolve(req, error)
        else:
            req.future.cancel()

    # -------------------------------------------------------------- dispatch
    def _pump(self) -> None:
        """Start batches while a runner is idle and work is ready."""
        # Every request calls this; while all runners are busy it must cost nothing.
        while not self._paused and self._in_flight < self._capacity:
            slot = self._idle_slot()
            if slot is None:
                return
            batch = self._take_batch()
            if batch is None:
                return
            self._launch(slot, batch)

    def _idle_slot(self) -> RunnerSlot | None:
        free = [s for s in self._slots if s.in_flight < s.capacity]
        return min(free, key=lambda s: s.in_flight / s.capacity) if free else None

    def _take_batch(self) -> list[PendingRequest] | None:
        """Pop the next batch, or None if nothing (yet) should run."""
        now = self._clock()
        head = self._head(now)
        if head is None:
            return None
        limit = self.config.max_batch_size if self.batched else 1
        candidates = [
            r
            for r in itertools.chain.from_iterable(self._queues)
            if r.state is _State.QUEUED and r.bucket == head.bucket
        ]
        waiting = sum(r.rows for r in candidates)
        delay = self.config.max_queue_delay_s
        filled = waiting >= limit or waiting in self.config.preferred_batch_sizes
        if delay > 0 and not filled and now - head.enqueued_at < delay:
            self._arm_timer(head.enqueued_at + delay - now)
            return None
        target = self._target_rows(waiting, limit)
        batch: list[PendingRequest] = []
        rows = 0
        for req in candidates:
            if rows + req.rows > target:
                continue
            if req.deadline is not None and req.deadline <= now:
                self._withdraw(req, Expired(f"model {self.name!r}: deadline exceeded while queued"))
                continue
            batch.append(req)
            rows += req.rows
            if rows == target:
                break
        for req in batch:
            req.state = _State.RUNNING
            self._queued -= 1
        return batch or None

    def _target_rows(self, waiting: int, limit: int) -> int:
        """The largest preferred size that the waiting rows fill, else the limit."""
        fitting = [s for s in self.config.preferred_batch_sizes if s <= min(waiting, limit)]
        return max(fitting) if fitting else limit

    def _head(self, now: float) -> PendingRequest | None:
        """The oldest live request of the highest non-empty priority; drops dead entries."""
        for queue in self._queues:
            while queue:
                req = queue[0]
                if req.state is not _State.QUEUED:
                    queue.popleft()
                    continue
                if req.deadline is not None and req.deadline <= now:
                    queue.popleft()
                    self._withdraw(req, Expired(f"model {self.name!r}: deadline exceeded while queued"))
                    continue
                return req
        return None

    def _arm_timer(self, after: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(after, self._pump)

    def _launch(self, slot: RunnerSlot, batch: list[PendingRequest]) -> None:
        slot.in_flight += 1
        self._in_flight += 1
        self._idle.clear()
        version = self.constants_version
        now = self._clock()
        waits = [now - r.enqueued_at for r in batch]
        compute = [0.0]

        def job() -> list[list[torch.Tensor]]:
            started = time.perf_counter()
            try:
                return self._execute(slot.runner, batch)
            finally:
                compute[0] = time.perf_counter() - started

        def done(results: list[list[torch.Tensor]] | None, error: BaseException | None) -> None:
            # Counted once per batch, here, also when its members are then retried alone.
            rows = sum(r.rows for r in batch)
            stats = self.stats
            stats.batches += 1
            stats.requests += len(batch)
            stats.rows += rows
            stats.batch_sizes[rows] += 1
            stats.queue_seconds += sum(waits)
            stats.compute_seconds += compute[0]
            stats.last_batch_at = time.time()
            slot.batches += 1
            self._telemetry.batch_finished(self.name, slot.label, rows, waits, compute[0], error is None)
            self._finish(slot, batch, version, results, error)

        self._workers.submit(job, done)

    def _finish(
        self,
        slot: RunnerSlot,
        batch: list[PendingRequest],
        version: int,
        results: list[list[torch.Tensor]] | None,
        error: BaseException | None,
    ) -> None:
        """On the loop: answer a batch's requests, then free its runner."""
        if error is not None and len(batch) > 1:
            # One bad request must not fail its neighbours: run each alone. The
            # runner stays taken until they are done.
            task = asyncio.get_running_loop().create_task(self._retry_alone(slot, batch, version))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)
            task.add_done_callback(self._log_crash)
            return
        try:
            if error is not None:
                log.warning("model %r: run failed: %s", self.name, error)
                _resolve(batch[0], ExecutionFailed(f"model {self.name!r}: run failed: {error}"))
            else:
                assert results is not None
                for req, outputs in zip(batch, results, strict=True):
                    _resolve(req, RunResult(outputs, version))
        finally:
            self._release(slot, batch)

    async def _retry_alone(self, slot: RunnerSlot, batch: list[PendingRequest], version: int) -> None:
        try:
            for req in batch:
                try:
                    (outputs,) = await self._workers.call(
                        functools.partial(self._execute, slot.runner, [req])
                    )
                    _resolve(req, RunResult(outputs, version))
                except Exception as exc:
                    log.warning("model %r: run failed: %s", self.name, exc)
                    _resolve(req, ExecutionFailed(f"model {self.name!r}: run failed: {exc}"))
        finally:
            self._release(slot, batch)

    def _release(self, slot: RunnerSlot, batch: list[PendingRequest]) -> None:
        for req in batch:
            # The invariant: no future is left pending, or its caller hangs.
            _resolve(req, ExecutionFailed(f"model {self.name!r}: batch ended without a result"))
        slot.in_flight -= 1
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        self._pump()

    def _execute(self, runner: Runner, batch: list[PendingRequest]) -> list[list[torch.Tensor]]:
        """Runs in an executor thread: concatenate, run, split."""
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = [torch.cat(parts) for parts in zip(*(r.inputs for r in batch), strict=True)]
        rows = [r.rows for r in batch]
        total = sum(rows)
        padded = total
        if self.pad_to is not None and total < self.pad_to:
            padded = self.pad_to
            inputs = [torch.cat([t, t.new_zeros((padded - total, *t.shape[1:]))]) for t in inputs]
        outputs = runner.run(inputs)
        if not self.batched:
            return [outputs]
        for i, out in enumerate(outputs):
            if out.dim() == 0 or out.shape[0] != padded:
                raise ExecutionFailed(
                    f"output {i} has shape {list(out.shape)}; expected {padded} rows on dim 0"
                )
        if padded != total:
            outputs = [out[:total] for out in outputs]
        if len(batch) == 1:
            return [outputs]
        split = [torch.split(out, rows) for out in outputs]
        return [list(parts) for parts in zip(*split, strict=True)]

    # ------------------------------------------------------------- exclusive
    async def exclusive(self, fn: Callable[[], T], *, bump_version: bool) -> T:
        """Run `fn` in a worker thread while no batch runs (for constant updates).

        Dispatch pauses, running batches finish on the old constants, `fn` runs,
        then dispatch resumes: no batch ever sees a half-applied update.
        """
        async with self._exclusive_lock:
            self._paused += 1
            try:
                await self._idle.wait()
                result = await self._workers.call(fn)
                if bump_version:
                    self.constants_version += 1
                return result
            finally:
                self._paused -= 1
                self._pump()

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("model %r: scheduler task failed", self.name, exc_info=task.exception())
