"""One place where domain errors become gRPC status codes: a server interceptor."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from loader.errors import ErrorKind, InvalidInput, Pt2ServeError

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


class DomainErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Turns a `Pt2ServeError` escaping a handler into its status and message."""

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
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary, streaming_request=True))
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


def _wrap_unary(
    fn: Callable[..., Awaitable[Any]], streaming_request: bool = False
) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, _Undecodable):
                raise request.refusal()
            return await fn(_checked(request) if streaming_request else request, context)
        except Pt2ServeError as exc:
            await context.abort(status_of(exc), str(exc))

    return wrapped


def _wrap_stream(
    fn: Callable[..., AsyncIterator[Any]], streaming_request: bool = False
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        try:
            if isinstance(request, _Undecodable):
                raise request.refusal()
            async for item in fn(_checked(request) if streaming_request else request, context):
                yield item
        except Pt2ServeError as exc:
            await context.abort(status_of(exc), str(exc))

    return wrapped
