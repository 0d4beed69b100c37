"""One place where domain errors become gRPC status codes: a server interceptor."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from pt2serve.loader.errors import ErrorKind, InvalidInput, Pt2ServeError

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


class DomainErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns a `Pt2ServeError` escaping a handler into its status and message, and
    counts the unary-response calls inside handlers (`calls`)."""

    def __init__(self, calls: CallsInFlight | None = None) -> None:
        self.calls = calls or CallsInFlight()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        calls = self.calls
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, calls))
        if handler.stream_unary is not None:
            return handler._replace(
                stream_unary=_wrap_unary(handler.stream_unary, calls, streaming_request=True)
            )
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream, streaming_request=True))
        return handler


class _Undecodable:
    """Stands in for a request message that failed to parse, so the call can end with
    INVALID_ARGUMENT instead of the framework's UNKNOWN."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def refusal(self) -> InvalidInput:
        return InvalidInput(
            f"the request is not a valid protobuf message of this method's type: {self.error}"
        )


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            raise request.refusal()
        yield request


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: Pt2ServeError) -> None:
    if not context.done():  # nobody is left to tell once the call has ended
        await context.abort(status_of(error), message_of(error))


def _wrap_unary(
    fn: Callable[..., Awaitable[Any]], calls: CallsInFlight, streaming_request: bool = False
) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        calls.enter()
        try:
            if isinstance(request, _Undecodable):
                raise request.refusal()
            return await fn(_checked(request) if streaming_request else request, context)
        except Pt2ServeError as exc:
            await _abort(context, exc)
        finally:
            calls.leave()

    return wrapped


def _wrap_stream(
    fn: Callable[..., AsyncIterator[Any]], streaming_request: bool = False
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            if isinstance(request, _Undecodable):
                raise request.refusal()
            async for item in fn(_checked(request) if streaming_request else request, context):
                if context.done():
                    # The client cancelled or went away: writing now fails inside grpc
                    # (logged there as an ExecuteBatchError). The handler's cleanup
                    # withdraws its queued work when the generator closes.
                    return
                yield item
        except Pt2ServeError as exc:
            await _abort(context, exc)

    return wrapped
