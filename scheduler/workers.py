"""Worker threads for blocking model calls, with one wake-up each way.

`loop.run_in_executor` costs two event-loop iterations and a chain of
concurrent.futures callbacks per call; on a small model that overhead is larger
than the model. Here a job is a queue put, and its result comes back as one
`call_soon_threadsafe` callback on the loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
Done = Callable[[Any, BaseException | None], None]
# Set once by the serving process (set_intra_op_threads); None: torch's default.
_intra_op_threads: int | None = None


def set_intra_op_threads(threads: int) -> None:
    """The intra-op threads (OpenMP, MKL) of model calls in this thread and in every
    worker thread started from now on. OpenMP keeps the count per thread: a count set
    on the main thread alone would not reach the threads that run the models."""
    global _intra_op_threads
    _intra_op_threads = threads
    torch.set_num_threads(threads)


class WorkerPool:
    def __init__(self, threads: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Done] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[], Any], done: Done) -> None:
        """Run `fn` on a worker; `done(result, error)` is then called on the loop."""
        self._jobs.put((fn, done))

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run `fn` on a worker; await the returned future for its result."""
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.submit(fn, done)
        return future

    def close(self) -> None:
        """Stop the threads once the jobs already queued have run."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            if thread.is_alive():
                thread.join()

    def _work(self) -> None:
        prepare_thread(threading.current_thread().name)
        while (job := self._jobs.get()) is not None:
            fn, done = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # delivered to the loop, never lost
                error = exc
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:
                log.error("event loop closed before a worker result was delivered", exc_info=error)


def prepare_thread(name: str) -> None:
    """Make the calling thread one that runs models: its OS name, and the intra-op
    threads its model calls may use (set_intra_op_threads)."""
    _name_native_thread(name)
    if _intra_op_threads is not None:
        torch.set_num_threads(_intra_op_threads)


def _name_native_thread(name: str) -> None:
    """Give the OS thread the Python thread's name (first 15 bytes), so runner threads
    show up as such in `top -H`, `ps -L` and /proc (Linux only; best effort)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
