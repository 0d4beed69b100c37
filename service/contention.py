"""Whether this process's event loop is starved for CPU, from what Linux reports.

The event loop's thread is *starved* when, over a window, either
- it wanted a CPU nearly all the time (running, or runnable and waiting on a run
  queue) and spent a noticeable part of that waiting: it has no idle time, and
  requests pile up in front of it where no scheduler can see them (in gRPC's
  buffers); or
- it waited on a run queue for a large share of the wall time, idle moments or
  not: the machine's CPUs are oversubscribed (a compute-bound model's intra-op
  threads take every core while a batch runs).
Either way, CPU spent anywhere else on the machine, an engine's batches included,
slows it down. Adaptive batching waits longer for fuller batches while any loop that
feeds it is starved (scheduler/adaptive.py).

Source: `/proc/self/task/<tid>/schedstat` (time on a CPU and time waiting on a run queue,
in nanoseconds, per thread; Linux with schedstats, which distribution kernels have).
Elsewhere the probe reports nothing and batching keeps its uncontended rule.

Measured on 2 CPUs (docs/performance.md), as shares of wall time of a front end's
loop thread (on a CPU, waiting for one): the small model behind one front end at 64
requests in flight, 84 % and 14 % (starved by the first rule), at 4 in flight 74 % and
11 %, at 1 in flight 50 % and 7 %; behind two front ends at 4 in flight, 15-52 % and
10-23 %; the compute-bound model behind two at 64 in flight, 29-57 % and 30-47 %
(starved by the second rule).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

WINDOW_S = 0.2
# Starved from the window in which the thread wanted a CPU this share of the time
# and waited for one at least WAITING of it, or waited for one at least QUEUED of the
# time; no longer once it wants a CPU less than BUSY_OFF of the time and waits less
# than QUEUED_OFF (hysteresis: the longer batching waits take load off the CPUs, so
# the thread then waits less for one, but the CPUs are still oversubscribed).
BUSY, WAITING = 0.95, 0.05
BUSY_OFF = 0.90
QUEUED, QUEUED_OFF = 0.35, 0.25


def _schedstat_path() -> str | None:
    path = f"/proc/self/task/{threading.get_native_id()}/schedstat"
    try:
        with open(path) as f:
            f.read()
    except OSError:
        return None
    return path


def read_schedstat(path: str) -> tuple[int, int]:
    """(ns on a CPU, ns waiting on a run queue) of a thread so far."""
    with open(path) as f:
        on_cpu, waiting, _ = f.read().split()
    return int(on_cpu), int(waiting)


class StarvationProbe:
    """Samples the calling thread (create it on the event loop's thread) every
    `window_s`, and calls `changed(starved)` whenever its verdict changes."""

    def __init__(self, changed: Callable[[bool], None], window_s: float = WINDOW_S) -> None:
        self._changed = changed
        self._window_s = window_s
        self._path = _schedstat_path()
        self.starved = False

    @property
    def available(self) -> bool:
        return self._path is not None

    def judge(self, busy: float, waiting: float) -> bool:
        """The verdict for a window in which the thread wanted a CPU `busy` of the
        time (0..1), `waiting` of it on a run queue."""
        if self.starved:
            return busy >= BUSY_OFF or waiting >= QUEUED_OFF
        return (busy >= BUSY and waiting >= WAITING) or waiting >= QUEUED

    async def run(self) -> None:
        """Until cancelled."""
        if self._path is None:
            log.info("no schedstat for threads here: batching ignores CPU contention")
            return
        path = self._path
        on_cpu, waiting = read_schedstat(path)
        at = time.monotonic_ns()
        while True:
            await asyncio.sleep(self._window_s)
            now_cpu, now_waiting = read_schedstat(path)
            now = time.monotonic_ns()
            wall = max(now - at, 1)
            busy = (now_cpu - on_cpu + now_waiting - waiting) / wall
            starved = self.judge(busy, (now_waiting - waiting) / wall)
            on_cpu, waiting, at = now_cpu, now_waiting, now
            if starved != self.starved:
                self.starved = starved
                self._changed(starved)
