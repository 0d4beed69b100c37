"""Graceful shutdown as gRPC clients expect it, one sequence for every process that
serves the public port (the one-process server and each front end):

1. SIGTERM or SIGINT: health, readiness and every model turn NOT_SERVING at once;
   liveness stays SERVING until the process exits.
2. For `drain_delay_s` the server keeps serving normally, so that whatever routes
   by readiness (Kubernetes endpoints, clients that watch health) moves away first.
   A second signal ends the delay.
3. GOAWAY on every connection and the listener closed (`grpc.aio.Server.stop`):
   clients send new calls on a new connection, to another replica; a call that
   raced the GOAWAY is retried by the client library itself. Inference streams stop
   reading, answer every request they read and end UNAVAILABLE (send the rest on a
   new stream); health Watch streams end.
4. Calls in handlers finish within `drain_grace_s`; whatever is left then is
   cancelled. The process exits 0.

No call is refused because the server drains: before the GOAWAY every call is served,
after it gRPC itself keeps new calls off the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the supervising parent imports this module, and no gRPC
    import grpc

    from pt2serve.service.errors import CallsInFlight

log = logging.getLogger(__name__)


class StopSignals:
    """The first SIGTERM or SIGINT begins shutdown; a second ends the drain delay."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.begun = asyncio.Event()
        self.hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.received)

    def received(self) -> None:
        if self.begun.is_set():
            self.hurry.set()
        else:
            self.begun.set()

    async def wait(self) -> None:
        await self.begun.wait()


async def drain_delay(delay_s: float, hurry: asyncio.Event | None) -> None:
    """Step 2: serve on for `delay_s`, or until `hurry` is set."""
    if delay_s <= 0:
        return
    log.info("NOT_SERVING; serving on for %.1fs before closing connections", delay_s)
    if hurry is None:
        await asyncio.sleep(delay_s)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), delay_s)


async def goaway_and_finish(
    server: grpc.aio.Server, calls: CallsInFlight, draining: asyncio.Event, grace_s: float
) -> bool:
    """Steps 3 and 4; True if every call in a handler finished within the grace."""
    deadline = time.monotonic() + grace_s
    draining.set()  # inference streams stop reading; Watch streams end
    stopping = asyncio.ensure_future(server.stop(grace_s))
    try:
        finished = await calls.wait_idle(deadline)
        if not finished:
            log.warning("drain grace over: cancelling %d call(s) still in handlers", calls.count)
    finally:
        await stopping
    return finished
