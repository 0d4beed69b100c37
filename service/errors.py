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
    """The calls inside their handlers that shutdown waits for: unary calls and
    inference streams. Streams that may stay open for as long as their client likes
    and carry no inference are not counted (`service/calls.py`, `LINGERING`): health's
    Watch ends at the GOAWAY, a reflection stream still open at the end of the grace
    is cancelled. Per call this is one increment and one decrement.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, deadline: float) -> bool:
        """Return True once no counted call is in a handler; False if the monotonic
        `deadline` came first."""
        while self.count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), remaining)
            except TimeoutError:
                return False
            finally:
                self._idle = None
        return True
