"""`RequestQueue`: one model's waiting requests, by priority, and which of them form
the next batch. It decides what runs next; `ModelScheduler` decides when and where."""

from __future__ import annotations

import collections
import itertools

from pt2serve.loader.errors import Expired
from pt2serve.scheduler.adaptive import AdaptiveWait
from pt2serve.scheduler.batches import PendingRequest, State, resolve
from pt2serve.scheduler.config import BatchingConfig


class RequestQueue:
    def __init__(
        self, name: str, config: BatchingConfig, batched: bool, adaptive: AdaptiveWait | None = None
    ) -> None:
        self._name = name
        self._adaptive = adaptive
        self._config = config
        self._limit = config.max_batch_size if batched else 1
        self._delay = config.max_queue_delay_s
        self._queues: list[collections.deque[PendingRequest]] = [
            collections.deque() for _ in range(config.priority_levels)
        ]
        # Live (QUEUED) requests; withdrawn ones stay in the deques until passed over.
        self.size = 0
        # Live rows by bucket: how full the next batch would be, without a scan
        # (`take` runs on every arrival while a batch waits to fill).
        self._rows: dict[object, int] = {}

    def push(self, req: PendingRequest) -> None:
        self._queues[req.priority].append(req)
        self.size += 1
        self._rows[req.bucket] = self._rows.get(req.bucket, 0) + req.rows

    def _left(self, req: PendingRequest) -> None:
        self.size -= 1
        left = self._rows[req.bucket] - req.rows
        if left:
            self._rows[req.bucket] = left
        else:
            del self._rows[req.bucket]

    def withdraw(self, req: PendingRequest, error: BaseException | None) -> None:
        """Take a queued request out (lazily: `take` skips it): resolved with `error`,
        or cancelled. Requests that already left the queue are not touched."""
        if req.state is not State.QUEUED:
            return
        self._left(req)
        req.state = State.DONE
        if error is not None:
            resolve(req, error)
        else:
            req.future.cancel()

    def take(self, now: float) -> tuple[list[PendingRequest] | None, float | None]:
        """The next batch (its requests marked RUNNING), or None with how long to wait
        for a fuller one (None: nothing is waiting)."""
        head = self._head(now)
        if head is None:
            return None, None
        waiting = self._rows[head.bucket]
        filled = waiting >= self._limit or waiting in self._config.preferred_batch_sizes
        if not filled:
            age = now - head.enqueued_at
            if self._delay > 0 and age < self._delay:
                return None, self._delay - age
            if self._adaptive is not None and (hold := self._adaptive.hold(waiting, age, now)) > 0:
                return None, hold
        candidates = [
            r
            for r in itertools.chain.from_iterable(self._queues)
            if r.state is State.QUEUED and r.bucket == head.bucket
        ]
        target = self._target_rows(waiting)
        batch: list[PendingRequest] = []
        rows = 0
        for req in candidates:
            if rows + req.rows > target:
                continue
            if req.deadline is not None and req.deadline <= now:
                self.withdraw(req, self.expired())
                continue
            batch.append(req)
            rows += req.rows
            if rows == target:
                break
        for req in batch:
            req.state = State.RUNNING
            self._left(req)
        return batch or None, None

    def fail_all(self, error: BaseException) -> None:
        for queue in self._queues:
            while queue:
                self.withdraw(queue.popleft(), error)

    def expired(self) -> Expired:
        return Expired(f"model {self._name!r}: deadline exceeded while queued")

    def _target_rows(self, waiting: int) -> int:
        """The largest preferred size that the waiting rows fill, else the limit."""
        fitting = [s for s in self._config.preferred_batch_sizes if s <= min(waiting, self._limit)]
        return max(fitting) if fitting else self._limit

    def _head(self, now: float) -> PendingRequest | None:
        """The oldest live request of the highest non-empty priority; drops dead entries."""
        for queue in self._queues:
            while queue:
                req = queue[0]
                if req.state is not State.QUEUED:
                    queue.popleft()
                    continue
                if req.deadline is not None and req.deadline <= now:
                    queue.popleft()
                    self.withdraw(req, self.expired())
                    continue
                return req
        return None
