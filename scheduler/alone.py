"""Runs of a model outside its batches, and what keeps them apart: a function that
needs the model to itself (`exclusive`: constant updates), and a lone request that
the engine's intake thread runs the moment it reads it (`run_alone`,
service/intake.py) instead of queueing it for a runner thread.

One lock (`_alone`) is held by every run alone and by every exclusive function, so
an update never lands in the middle of a run alone, and a run alone never starts
while an update waits (`_paused`) or the model closes (`_closing`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from pt2serve.loader.dtypes import AnyTensor
from pt2serve.loader.errors import Pt2ServeError
from pt2serve.scheduler.adaptive import AdaptiveWait
from pt2serve.scheduler.batches import RunnerSlot, check_request, run_batch
from pt2serve.scheduler.config import BatchingConfig
from pt2serve.scheduler.queue import RequestQueue
from pt2serve.scheduler.workers import WorkerPool

T = TypeVar("T")


class RunsAlone:
    """The part of ModelScheduler (scheduler/batcher.py) that runs a model outside
    its batches."""

    # Set by ModelScheduler.
    name: str
    config: BatchingConfig
    batched: bool
    pad_to: int | None
    constants_version: int
    adaptive: AdaptiveWait | None
    _slots: list[RunnerSlot]
    _queue: RequestQueue
    _workers: WorkerPool
    _in_flight: int
    _paused: int
    _closing: bool
    _idle: asyncio.Event
    _exclusive_lock: asyncio.Lock
    _alone: threading.Lock
    _clock: Callable[[], float]

    def _dispatch(self) -> None:
        raise NotImplementedError

    def _record(
        self, slot: RunnerSlot, rows: int, waits: list[float], compute: float, turn: float, error: object
    ) -> None:
        raise NotImplementedError

    async def exclusive(self, fn: Callable[[], T], *, bump_version: bool) -> T:
        """Run `fn` in a worker thread while no batch runs (for constant updates).

        Dispatch pauses, running batches and any run alone finish on the old
        constants, `fn` runs, then dispatch resumes: no batch ever sees a
        half-applied update.
        """
        async with self._exclusive_lock:
            self._paused += 1
            try:
                await self._idle.wait()
                result = await self._workers.call(self._locked(fn))
                if bump_version:
                    self.constants_version += 1
                return result
            finally:
                self._paused -= 1
                self._dispatch()

    def run_alone(
        self,
        inputs: Sequence[AnyTensor],
        *,
        priority: int,
        timeout_s: float | None,
        deadline: float | None,
    ) -> tuple[list[AnyTensor], int, float] | None:
        """From a thread that is not the loop's: run one checked request at once,
        outside the queue, if the model is idle and would start it at once anyway
        (no delay asked for, no batching wait, nothing queued or running). Returns its
        outputs, the constants version they ran with and the compute seconds; None
        when it did not run (the caller queues it as usual, which also answers any
        request `enqueue` would refuse). Raises what the run raises. The loop then
        counts it (`ran_alone`)."""
        if not self._alone.acquire(blocking=False):
            return None
        try:
            if self._paused or self._closing or self._in_flight or self._queue.size:
                return None
            now = self._clock()
            try:
                rows, deadline = check_request(
                    self.config, self.name, self.batched, inputs, priority, timeout_s, deadline, now
                )
            except Pt2ServeError:
                return None
            if deadline is not None and deadline <= now:
                return None  # the loop answers it: expired
            if self.config.max_queue_delay_us or rows > self.config.max_batch_size:
                return None
            if self.adaptive is not None and self.adaptive.hold(rows, 0.0, now) > 0:
                return None
            version = self.constants_version
            started = time.perf_counter()
            runner = self._slots[0].runner
            (outputs,) = run_batch(runner, [inputs], [rows], batched=self.batched, pad_to=self.pad_to)
            return outputs, version, time.perf_counter() - started
        finally:
            self._alone.release()

    def ran_alone(self, rows: int, compute: float, error: BaseException | None) -> None:
        """On the loop: count a request that `run_alone` ran, as a batch of one."""
        if self.adaptive is not None:
            self.adaptive.arrived(self._clock(), False)
            self.adaptive.left()  # answered already
        self._record(self._slots[0], rows, [0.0], compute, compute, error)

    async def _wait_alone(self) -> None:
        """Until no run alone is running (the model is closing: none starts again)."""
        await asyncio.to_thread(self._locked(lambda: None))

    def _locked(self, fn: Callable[[], T]) -> Callable[[], T]:
        def locked() -> T:
            with self._alone:
                return fn()

        return locked
