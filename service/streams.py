"""The one stream engine behind both protocols' streaming inference RPCs.

Requests are submitted as they arrive and run concurrently; each answer (or error)
is sent as soon as it is ready, or in request order when the stream asks for it. A
failed request is answered on its own and the stream stays open. When the client's
half ends, the stream answers what it accepted, then ends OK; when the server drains,
it stops reading, answers what it accepted, then ends UNAVAILABLE; when the call ends
early (cancel, client gone), every queued request is withdrawn.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

from pt2serve.loader.errors import ExecutionFailed, Pt2ServeError, Unavailable
from pt2serve.scheduler.dataplane import InferenceResult, OnDone, Withdrawable

log = logging.getLogger(__name__)
Request = TypeVar("Request")
Response = TypeVar("Response")


class StreamProtocol(Generic[Request, Response]):
    """What a protocol gives the engine: how to submit a request, and how to answer
    it with a result or an error. `answer` and `refuse` run on the loop."""

    def __init__(
        self,
        submit: Callable[[Request, OnDone], Withdrawable],
        answer: Callable[[Request, InferenceResult], Response],
        refuse: Callable[[Request, Pt2ServeError], Response],
    ) -> None:
        self.submit = submit
        self.answer = answer
        self.refuse = refuse


async def serve_stream(
    requests: AsyncIterator[Request],
    protocol: StreamProtocol[Request, Response],
    *,
    ordered: bool,
    stop: asyncio.Event | None = None,
) -> AsyncIterator[Response]:
    """Serve one stream. Once `stop` is set (the server drains), no more requests are
    read; those read are answered, and the call ends with UNAVAILABLE, so the client
    sends the rest on a new stream, to a replica that is not draining."""
    answers: _Answers[Response] = _Answers(ordered)
    tickets: set[Withdrawable] = set()

    def respond(request: Request, slot: _Slot[Response], outcome: InferenceResult | BaseException) -> None:
        try:
            if isinstance(outcome, InferenceResult):
                answers.fill(slot, protocol.answer(request, outcome))
                return
            raise outcome
        except Pt2ServeError as exc:
            error = exc
        except Exception as exc:
            log.exception("a stream request failed")
            error = ExecutionFailed(f"internal error: {exc}")
        answers.fill(slot, protocol.refuse(request, error))

    def settled(
        request: Request,
        slot: _Slot[Response],
        mine: list[Withdrawable],
        outcome: InferenceResult | BaseException,
    ) -> None:
        tickets.difference_update(mine)
        respond(request, slot, outcome)

    async def read() -> bool:
        """Submit each request read; True if draining stopped it, False at the end of
        the client's half."""
        async for request in requests:
            if stop is not None and stop.is_set():
                # Set before the models stop taking requests: nothing read from here
                # on is submitted (the client sends it again, unanswered).
                return True
            slot = answers.reserve()
            mine: list[Withdrawable] = []  # filled once submitted; on_done runs later
            try:
                ticket = protocol.submit(request, functools.partial(settled, request, slot, mine))
            except Exception as exc:
                respond(request, slot, exc)
                continue
            mine.append(ticket)
            tickets.add(ticket)
        return False

    async def run() -> bool:
        """Read until the client's half ends, or the server drains; then wait for what
        was accepted. Returns whether draining cut the stream short."""
        reader = asyncio.create_task(read())
        stopping = asyncio.create_task(stop.wait()) if stop is not None else None
        try:
            await asyncio.wait([t for t in (reader, stopping) if t is not None], return_when=FIRST_COMPLETED)
            if reader.done():
                drained = reader.result()  # a request that could not be read ends the call
            else:
                drained = True
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            if tickets:
                await asyncio.wait([t.future for t in tickets])
            return drained
        finally:
            for task in (reader, stopping):
                if task is not None:
                    task.cancel()
            answers.close()

    runner = asyncio.create_task(run())
    try:
        while (ready := await answers.take()) is not None:
            for item in ready:
                yield item
        if await runner:
            raise Unavailable(
                "the server is draining: every request read on this stream was answered; "
                "send the others again on a new stream (another replica)"
            )
    finally:
        # The client went away or the call was cancelled: withdraw its queued work.
        runner.cancel()
        for ticket in list(tickets):
            ticket.cancel()
        await asyncio.gather(runner, return_exceptions=True)


class _Slot(Generic[Response]):
    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: Response | None = None


class _Answers(Generic[Response]):
    """A stream's responses: sent as they complete, or held back to request order.

    Filled by callbacks on the loop and drained by the stream's writer, which takes
    everything ready at once: one wake-up of the writer per burst, not per answer.
    """

    def __init__(self, ordered: bool) -> None:
        self._ready: list[Response] = []
        self._closed = False
        self._wakeup: asyncio.Future[None] | None = None
        self._ordered = ordered
        self._waiting: collections.deque[_Slot[Response]] = collections.deque()
        self._unordered: _Slot[Response] = _Slot()

    def reserve(self) -> _Slot[Response]:
        if not self._ordered:
            return self._unordered  # never written: unordered answers go straight out
        slot: _Slot[Response] = _Slot()
        self._waiting.append(slot)
        return slot

    def fill(self, slot: _Slot[Response], response: Response) -> None:
        if not self._ordered:
            self._ready.append(response)
        else:
            slot.response = response
            while self._waiting and self._waiting[0].response is not None:
                done = self._waiting.popleft().response
                assert done is not None
                self._ready.append(done)
        if self._ready:
            self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def take(self) -> list[Response] | None:
        """Every response ready now (waiting for one); None once closed and drained."""
        while not self._ready:
            if self._closed:
                return None
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        ready, self._ready = self._ready, []
        return ready
