"""The engine's intake: a thread that reads the front ends' connections while the
engine has nothing in flight, and runs a lone request the moment it reads it.

A request that the event loop reads must still wake a runner thread before it can
run: one more thread wake-up on the way of every request sent one at a time, and
the loop's queueing work before it (docs/performance.md, "Eighth round"). While the
engine is idle, the intake thread reads instead, checks the request, runs it
(`ModelScheduler.run_alone`) and writes the answer, all on one thread; the loop then
only counts it.

Who reads the connections: one of the two, never both.
- The loop, while a request it queued is unanswered, and from when the intake hands
  the connections back until the engine is idle again.
- The intake thread, from when the loop has nothing in flight (`offer`) until it
  reads what it does not run itself: more than one frame at once (requests that the
  loop should batch), a frame that is not a request, a request the model cannot run
  at once (busy, a batching wait, a delay asked for, a bad request), or the end of
  a connection. It then hands the connections back, with the frames it read, which
  the loop handles in order as if it had read them (`_resume`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import select
import threading
from collections.abc import Callable, Collection

from pt2serve.scheduler.workers import prepare_thread
from pt2serve.service.links import SocketLink

log = logging.getLogger(__name__)
# Runs a request frame at once and answers it; False if it did not (nothing sent).
RunNow = Callable[[SocketLink, bytearray], bool]


class _Reader(enum.Enum):
    LOOP = "loop"
    THREAD = "thread"
    RETURNING = "returning"  # the thread stopped reading; the loop has not resumed yet


class Intake:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        links: Callable[[], Collection[SocketLink]],
        run_now: RunNow,
        idle: Callable[[], bool],
    ) -> None:
        self._loop = loop
        self._links = links
        self._run_now = run_now
        self._idle = idle
        self._lock = threading.Lock()
        self._reader = _Reader.LOOP  # under the lock
        self._reading: list[SocketLink] = []  # the thread's connections (under the lock)
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._work, name="pt2serve-intake", daemon=True)
        # Requests the thread ran itself, and times it gave the connections back to
        # the loop (tests and docs read them).
        self.ran = 0
        self.handed_back = 0

    @property
    def reading(self) -> bool:
        """Whether the thread reads the connections now."""
        return self._reader is _Reader.THREAD

    def start(self) -> None:
        self._thread.start()
        self.offer()

    def offer(self) -> None:
        """On the loop: let the thread read every connection, if the engine has
        nothing in flight and the loop reads them now."""
        if self._reader is not _Reader.LOOP or self._stopping or not self._idle():
            return
        links = [link for link in self._links() if not link.closed]
        if not links:
            return
        for link in links:
            link.pause_reading()
        with self._lock:
            self._reader = _Reader.THREAD
            self._reading = links
        self._wake()

    def add(self, link: SocketLink) -> None:
        """On the loop: a new connection, which the thread reads if it reads the
        others."""
        with self._lock:
            if self._reader is not _Reader.THREAD:
                return
            link.pause_reading()
            self._reading = [*self._reading, link]
        self._wake()

    async def stop(self) -> None:
        """On the loop: take the connections back for good and end the thread."""
        with self._lock:
            self._stopping = True
        self._wake()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)  # after its last hand-back
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # ------------------------------------------------------------- the thread
    def _work(self) -> None:
        prepare_thread(self._thread.name)
        try:
            self._serve()
        except Exception:
            # A bug here must not leave the connections unread: the loop takes them
            # for good.
            log.exception("the intake thread failed; the event loop reads from now on")
            with self._lock:
                self._stopping = True
                reader = self._reader
            if reader is _Reader.THREAD:
                self._hand_back([])

    def _serve(self) -> None:
        poller = select.poll()
        polled: list[SocketLink] = []
        while True:
            with self._lock:
                reader, reading, stopping = self._reader, self._reading, self._stopping
            if stopping:
                if reader is _Reader.THREAD:
                    self._hand_back([])
                return
            if reader is not _Reader.THREAD:
                select.select([self._wake_r], [], [])
                self._drain()
                continue
            if reading is not polled:
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                for link in reading:
                    poller.register(link.fileno(), select.POLLIN)
                polled = reading
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                self._drain()
            for link in reading:
                if link.fileno() in ready and self._read(link):
                    break

    def _read(self, link: SocketLink) -> bool:
        """Read `link` once; True if the connections went back to the loop."""
        frames = link.pull()
        if frames is None:  # its end: the loop finds it when it reads again
            self._hand_back([])
            return True
        if not frames:
            return False
        if len(frames) == 1:
            try:
                if self._run_now(link, frames[0]):
                    self.ran += 1
                    return False
            except Exception:  # nothing was sent: the loop handles the frame
                log.exception("the intake could not run a request; the event loop takes it")
        self._hand_back([(link, frames)])
        return True

    def _hand_back(self, read: list[tuple[SocketLink, list[bytearray]]]) -> None:
        with self._lock:
            self._reader = _Reader.RETURNING
            self._reading = []
            self.handed_back += 1
        self._loop.call_soon_threadsafe(self._resume, read)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # awake already: the pipe is full of wake-ups

    def _drain(self) -> None:
        os.read(self._wake_r, 4096)

    # --------------------------------------------------------------- the loop
    def _resume(self, read: list[tuple[SocketLink, list[bytearray]]]) -> None:
        """On the loop: read the connections again, after the frames the thread read."""
        with self._lock:
            self._reader = _Reader.LOOP
        for link in self._links():
            link.resume_reading()
        for link, frames in read:
            for frame in frames:
                if link.closed:
                    break
                link.received(frame)
        # Each connection is read once before the thread may have them again: the
        # end of one (the thread's reason to hand back, maybe) closes it here.
        for link in list(self._links()):
            link.read_now()
        self.offer()
