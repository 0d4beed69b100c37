"""Dynamic batching for one model: queue, form batches, dispatch to runners.

Invariants (the tests check each one):
- every submitted request's future is resolved exactly once: with its outputs, or
  with Overloaded, Expired, Unavailable or ExecutionFailed; a caller that is
  cancelled leaves no work behind;
- a batch holds at most `max_batch_size` rows and never mixes shape buckets
  (requests batch together only when every non-batch dim and dtype matches);
- a request that is cancelled or whose deadline passed while queued never runs;
- when a runner is idle and work is queued, a batch is dispatched at once, unless
  the user asked for `max_queue_delay` to grow batches, or measured batch costs say
  a short wait (at most `adaptive_delay`, scheduler/adaptive.py) buys throughput;
- the model runs in worker threads (scheduler/workers.py), never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pt2serve.loader.dtypes import AnyTensor
from pt2serve.loader.errors import ExecutionFailed, Expired, Overloaded, Unavailable
from pt2serve.scheduler.adaptive import AdaptiveWait, Contention
from pt2serve.scheduler.alone import RunsAlone
from pt2serve.scheduler.batches import (
    AnswerSink,
    PendingRequest,
    Runner,
    RunnerSlot,
    RunResult,
    SchedulerStats,
    State,
    answer_early,
    check_request,
    reassemble,
    resolve,
    run_batch,
    split_rows,
)
from pt2serve.scheduler.config import BatchingConfig
from pt2serve.scheduler.queue import RequestQueue
from pt2serve.scheduler.telemetry import NoTelemetry, Telemetry
from pt2serve.scheduler.workers import WorkerPool

log = logging.getLogger(__name__)
__all__ = ["BatchingConfig", "ModelScheduler", "Runner", "RunnerSlot", "RunResult", "SchedulerStats"]


class ModelScheduler(RunsAlone):
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
        contention: Contention | None = None,
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
        # Waiting for fuller batches when measured costs say it pays; not when the
        # user fixed a delay, nor for a model without a batch dimension.
        adaptive = config.adaptive_delay_us > 0 and config.max_queue_delay_us == 0 and batched
        self.adaptive = (
            AdaptiveWait(
                config.adaptive_delay_us / 1e6,
                config.max_batch_size,
                config.contended_delay_us / 1e6,
                contention,
            )
            if adaptive
            else None
        )
        self._queue = RequestQueue(name, config, batched, self.adaptive)
        self._in_flight = 0
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._paused = 0
        self._exclusive_lock = asyncio.Lock()
        self._closing = False
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0
        # Set once closing and nothing is queued or running.
        self._drained = asyncio.Event()
        self._capacity = sum(s.capacity for s in self._slots)
        self._workers = WorkerPool(self._capacity, f"pt2serve-{name}")
        self._claims = threading.Lock()  # runner thread answering vs. loop expiring
        # Held by `run_alone` and by `exclusive`'s function: never both at once.
        self._alone = threading.Lock()
        self._loop: asyncio.AbstractEventLoop  # set by start()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()  # kept: on Python 3.11 each call is a getpid()
        self._workers.start(self._loop)

    async def close(self, grace_s: float = 0.0) -> None:
        """Refuse new requests, let queued work finish within `grace_s`, fail the rest
        with Unavailable, wait for running batches, and stop the threads."""
        self._closing = True
        self._note_drained()
        try:
            await asyncio.wait_for(self._drained.wait(), grace_s)
        except TimeoutError:
            pass
        self._queue.fail_all(Unavailable(f"model {self.name!r} is shutting down"))
        await self._idle.wait()  # running batches resolve their own requests
        await self._wait_alone()
        if self._timer is not None:
            self._timer.cancel()
        self._workers.close()

    @property
    def queue_depth(self) -> int:
        return self._queue.size

    @property
    def slots(self) -> tuple[RunnerSlot, ...]:
        return tuple(self._slots)

    @property
    def batches_in_flight(self) -> int:
        return self._in_flight

    # --------------------------------------------------------------- submit
    def enqueue(
        self,
        inputs: list[AnyTensor],
        *,
        priority: int = 0,
        timeout_s: float | None = None,
        deadline: float | None = None,
        on_done: Callable[[asyncio.Future[RunResult]], None] | None = None,
        early: tuple[AnswerSink, Any] | None = None,
    ) -> asyncio.Future[RunResult]:
        """Queue validated inputs (call order); the future resolves with their outputs.

        `deadline` is absolute on this scheduler's clock (from the gRPC deadline);
        `timeout_s` (or the model's default timeout) can only shorten it.
        Cancelling the future withdraws a request that has not started running.
        Raises at once (nothing queued) when the request cannot be accepted.
        `on_done(future)` runs on the loop once the future is done: the same as a
        done-callback, but without scheduling a second callback per request.
        `early` = (sink, key): a runner thread may answer first (batches.answer_early).
        """
        if self._closing:
            raise Unavailable(f"model {self.name!r} is shutting down")
        now = self._clock()
        rows, deadline = check_request(
            self.config, self.name, self.batched, inputs, priority, timeout_s, deadline, now
        )
        if rows > self.config.max_batch_size:
            step = self.config.max_batch_size
            if self._queue.size + -(-rows // step) > self.config.max_queue_size:
                raise Overloaded(
                    f"model {self.name!r}: queue full ({self.config.max_queue_size} requests waiting)"
                )
            parts = [
                self._enqueue_one(part, part_rows, priority, deadline, now)
                for part, part_rows in split_rows(inputs, rows, step)
            ]
            whole = asyncio.ensure_future(reassemble(parts))
            if on_done is not None:
                whole.add_done_callback(on_done)
            return whole
        return self._enqueue_one(inputs, rows, priority, deadline, now, on_done, early)

    def _enqueue_one(
        self,
        inputs: list[AnyTensor],
        rows: int,
        priority: int,
        deadline: float | None,
        now: float,
        on_done: Callable[[asyncio.Future[RunResult]], None] | None = None,
        early: tuple[AnswerSink, Any] | None = None,
    ) -> asyncio.Future[RunResult]:
        if self._queue.size >= self.config.max_queue_size:
            raise Overloaded(
                f"model {self.name!r}: queue full ({self.config.max_queue_size} requests waiting)"
            )
        if deadline is not None and deadline <= now:
            raise Expired(f"model {self.name!r}: deadline passed before the request was queued")
        bucket = tuple((tuple(t.shape[1:]) if self.batched else tuple(t.shape), t.dtype) for t in inputs)
        loop = self._loop
        future: asyncio.Future[RunResult] = loop.create_future()
        req = PendingRequest(
            inputs, rows, bucket, priority, deadline, future, now, on_done=on_done, early=early
        )
        if self.adaptive is not None:
            self.adaptive.arrived(now, self._queue.size > 0 or self._in_flight > 0)
        self._queue.push(req)
        timer = None if deadline is None else loop.call_later(deadline - now, self._expire, req)
        future.add_done_callback(functools.partial(self._settled, req, timer))
        self._dispatch()
        return future

    def _settled(
        self, req: PendingRequest, timer: asyncio.TimerHandle | None, future: asyncio.Future[RunResult]
    ) -> None:
        if timer is not None:
            timer.cancel()
        if self.adaptive is not None:
            self.adaptive.left()
        if future.cancelled():
            # The caller went away (cancelled RPC, closed stream): a queued request
            # is withdrawn and never runs; a running one finishes for its batch.
            self._withdraw(req, None)
        if req.on_done is not None:
            req.on_done(future)

    def _expire(self, req: PendingRequest) -> None:
        if req.state is State.QUEUED:
            self._withdraw(req, self._queue.expired())
        elif req.state is State.RUNNING:
            # The caller's deadline has passed, so its answer is dropped (unless a
            # runner thread sent it already); the batch still completes for the others.
            with self._claims:
                if not req.claimed:
                    resolve(req, Expired(f"model {self.name!r}: deadline exceeded while running"))

    def _withdraw(self, req: PendingRequest, error: BaseException | None) -> None:
        """Take a queued request out of consideration (lazily: the dispatcher skips it)."""
        self._queue.withdraw(req, error)
        self._note_drained()

    def _note_drained(self) -> None:
        if self._closing and not self._queue.size and not self._in_flight:
            self._drained.set()

    # -------------------------------------------------------------- dispatch
    def _dispatch(self) -> None:
        """Start batches while a runner is idle and work is ready: the one place
        batches start. It runs whenever one of its conditions may have changed: a
        request arrived, a runner came free, the batching delay ran out, a pause for
        a constant update ended."""
        # Every request calls this; while all runners are busy it must cost nothing.
        while not self._paused and self._in_flight < self._capacity:
            batch, wait = self._queue.take(self._clock())
            if batch is None:
                if wait is not None:
                    self._arm_timer(wait)
                break
            free = [s for s in self._slots if s.in_flight < s.capacity]  # chosen per batch, not per arrival
            self._launch(min(free, key=lambda s: s.in_flight / s.capacity), batch)
        if self._closing:
            self._note_drained()  # taking may have dropped expired requests

    def _arm_timer(self, after: float) -> None:
        at = self._loop.time() + after  # (uvloop's handle of a timer due within 1 ms lacks when())
        if self._timer is not None:
            if self._timer_at <= at:
                return  # due no earlier than needed: it dispatches (and re-arms) then
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._timer_due)

    def _timer_due(self) -> None:
        self._timer = None
        self._dispatch()

    def _launch(self, slot: RunnerSlot, batch: list[PendingRequest]) -> None:
        slot.in_flight += 1
        self._in_flight += 1
        self._idle.clear()
        version = self.constants_version
        now = self._clock()
        waits = [now - r.enqueued_at for r in batch]
        compute = [0.0]

        def job() -> list[list[AnyTensor]]:
            started = time.perf_counter()
            try:
                results = self._execute(slot.runner, batch)
            finally:
                compute[0] = time.perf_counter() - started
            answer_early(self.name, batch, results, version, self._claims, self._clock, self._queue.size)
            return results

        def done(results: list[list[AnyTensor]] | None, error: BaseException | None) -> None:
            # The batch's whole turn, hand-offs to and from the worker included.
            self._record(slot, sum(r.rows for r in batch), waits, compute[0], self._clock() - now, error)
            self._finish(slot, batch, version, results, error)

        self._workers.submit(job, done)

    def _record(
        self, slot: RunnerSlot, rows: int, waits: list[float], compute: float, turn: float, error: object
    ) -> None:
        self.stats.record(rows, len(waits), sum(waits), compute)
        slot.batches += 1
        self._telemetry.batch_finished(self.name, slot.label, rows, waits, compute, error is None)
        if self.adaptive is not None and error is None:
            self.adaptive.ran(rows, turn)

    def _finish(
        self,
        slot: RunnerSlot,
        batch: list[PendingRequest],
        version: int,
        results: list[list[AnyTensor]] | None,
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
                resolve(batch[0], ExecutionFailed(f"model {self.name!r}: run failed: {error}"))
            else:
                assert results is not None
                for req, outputs in zip(batch, results, strict=True):
                    resolve(req, req.answer if req.answer is not None else RunResult(outputs, version))
        finally:
            self._release(slot, batch)

    async def _retry_alone(self, slot: RunnerSlot, batch: list[PendingRequest], version: int) -> None:
        try:
            for req in batch:
                try:
                    (outputs,) = await self._workers.call(
                        functools.partial(self._execute, slot.runner, [req])
                    )
                    resolve(req, RunResult(outputs, version))
                except Exception as exc:
                    log.warning("model %r: run failed: %s", self.name, exc)
                    resolve(req, ExecutionFailed(f"model {self.name!r}: run failed: {exc}"))
        finally:
            self._release(slot, batch)

    def _release(self, slot: RunnerSlot, batch: list[PendingRequest]) -> None:
        for req in batch:
            # The invariant: no future is left pending, or its caller hangs.
            resolve(req, ExecutionFailed(f"model {self.name!r}: batch ended without a result"))
        slot.in_flight -= 1
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        self._dispatch()
        self._note_drained()

    def _execute(self, runner: Runner, batch: list[PendingRequest]) -> list[list[AnyTensor]]:
        """In a worker thread: the batch's outputs, one list per request."""
        rows = [r.rows for r in batch]
        return run_batch(runner, [r.inputs for r in batch], rows, batched=self.batched, pad_to=self.pad_to)

    def _log_crash(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("model %r: scheduler task failed", self.name, exc_info=task.exception())
