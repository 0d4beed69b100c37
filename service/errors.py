"""One place where domain errors become gRPC status codes and messages, and the
count of calls in handlers that shutdown waits for."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pt2serve.loader.errors import ErrorKind, Pt2ServeError

log = logging.getLogger(__name__)

STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_of(error: Pt2ServeError) -> grpc.StatusCode:
    return STATUS[error.kind]


# Messages go back in trailers (a few KiB at most across proxies): values in them are
# already cut (loader.errors.shown), and the whole message is capped here too.
MAX_MESSAGE_CHARS = 1000


def message_of(error: Pt2ServeError) -> str:
    text = str(error)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


class CallsInFlight:
    """The unary-response calls inside their handlers, and how many have begun.

    Shutdown waits with `wait_quiet` before closing the listener: gRPC cancels the
    calls it holds when the server stops, and clients do not retry CANCELLED, while
    a draining server answers UNAVAILABLE, which they do. Response streams are not
    counted: they may stay open as long as their client likes (health Watch, an idle
    RunStream), and their requests are drained by the model manager. Per call this is
    two integer updates; the clock is read only while waiting.
    """

    def __init__(self) -> None:
        self.count = 0
        self.started = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1
        self.started += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_quiet(self, quiet_s: float, deadline: float) -> bool:
        """Return True once no call is in a handler and none began during `quiet_s`
        (clients have moved away); False if the monotonic `deadline` came first."""
        while True:
            now = time.monotonic()
            if now >= deadline:
                return False
            if self.count:
                self._idle = asyncio.Event()
                try:
                    await asyncio.wait_for(self._idle.wait(), deadline - now)
                except TimeoutError:
                    return False
                finally:
                    self._idle = None
                continue
            started = self.started
            await asyncio.sleep(min(quiet_s, deadline - now))
            if self.started == started and not self.count and time.monotonic() - now >= quiet_s:
                return True
