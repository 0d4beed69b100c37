"""Everything every call needs, applied once per method when it is registered (not
per call, as grpc.aio interceptors would): the standard gRPC server metrics, the
management token, domain errors as status codes, request messages that do not parse
answered INVALID_ARGUMENT, and the count of calls in handlers that shutdown waits for.

`Registrar` stands in for the server while the generated `add_*_to_server`
functions register their services, and wraps each method's handler with `wrap`.

Only the unary inference methods (`REGISTERED`) are registered with gRPC's core;
every other method is found by name through a generic handler. grpc.aio's server
keeps one pending "next call" future per registered method and waits on all of them
(`asyncio.wait`, FIRST_COMPLETED) for every call it accepts, so each registered method
costs every call: one wait took 27.7 µs over 31 futures and 15.1 µs over 4 (measured
alone on uvloop, docs/performance.md "Fifth round"). Management calls, streams (one
call per stream) and health checks are rare enough to be looked up by name.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from pt2serve.loader.errors import InvalidInput, Pt2ServeError
from pt2serve.service.errors import CallsInFlight, message_of, status_of
from pt2serve.service.metrics import GrpcMetrics, MethodMetrics
from pt2serve.service.security import MANAGEMENT_METHODS

Context = grpc.aio.ServicerContext[Any, Any]
REGISTERED = frozenset({"/pt2serve.v1.Inference/Run", "/inference.GRPCInferenceService/ModelInfer"})
# Streams that stay open for as long as their client likes and carry no inference:
# shutdown does not wait for them (service/shutdown.py); Watch ends at the GOAWAY.
LINGERING = frozenset(
    {
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
KINDS = (
    ("unary_unary", "unary"),
    ("unary_stream", "server_stream"),
    ("stream_unary", "client_stream"),
    ("stream_stream", "bidi_stream"),
)


class CallPolicy:
    """What `wrap` applies: metrics, the management token (None: management is open)
    and the drain accounting."""

    def __init__(
        self,
        metrics: GrpcMetrics,
        token: str | None,
        calls: CallsInFlight,
        draining: asyncio.Event | None = None,
    ) -> None:
        self.metrics = metrics
        self.expected = f"Bearer {token}".encode() if token else None
        self.calls = calls
        # Set at the GOAWAY (service/shutdown.py): lingering Watch streams end.
        self.draining = draining

    def authorized(self, method: str, context: Context) -> bool:
        if self.expected is None or method not in MANAGEMENT_METHODS:
            return True
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self.expected)
        return False


class Registrar:
    """Passed to generated `add_*_to_server(servicer, registrar)` in place of the
    server: every method handler reaches the server wrapped."""

    def __init__(
        self,
        server: grpc.aio.Server,
        policy: CallPolicy,
        substitute: Callable[[str, Any], Any] | None = None,
    ) -> None:
        self._server: Any = server  # grpc-stubs lacks add_registered_method_handlers
        self._policy = policy
        # (method path, handler) -> the handler to serve it with (a front end forwards
        # the methods it does not serve itself to the engine).
        self._substitute = substitute

    def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
        # Generated code (grpcio >= 1.62) passes the same handlers again to
        # add_registered_method_handlers, which registers both ways.
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        if self._substitute is not None:
            handlers = {name: self._substitute(f"/{service}/{name}", h) for name, h in handlers.items()}
        wrapped = {name: wrap(f"/{service}/{name}", h, self._policy) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        registered = {name: h for name, h in wrapped.items() if f"/{service}/{name}" in REGISTERED}
        if registered:
            self._server.add_registered_method_handlers(service, registered)


def wrap(method: str, handler: Any, policy: CallPolicy) -> Any:
    attr, kind = next((a, k) for a, k in KINDS if getattr(handler, a) is not None)
    inner = getattr(handler, attr)
    service, _, name = method.lstrip("/").partition("/")
    metrics = policy.metrics.for_method(kind, service, name)
    streaming_request = attr.startswith("stream_")
    calls = policy.calls
    counted = method not in LINGERING

    def refusal(request: Any, context: Context) -> Pt2ServeError | None:
        if not policy.authorized(method, context):
            return _Unauthenticated(
                f"{method} needs the management token (metadata 'authorization: Bearer <token>')"
            )
        if isinstance(request, _Undecodable):
            return request.refusal()
        return None

    def incoming(request: Any) -> Any:
        if not streaming_request:
            metrics.received.inc()
            return request
        return _checked(request, metrics.received)

    async def unary(request: Any, context: Context) -> Any:
        started = time.perf_counter()
        metrics.started.inc()
        calls.enter()
        try:
            if (refused := refusal(request, context)) is not None:
                raise refused
            response = await inner(incoming(request), context)
        except BaseException as exc:
            if not await _answer_error(exc, context, metrics, started):
                raise
        else:
            metrics.sent.inc()
            metrics.finish(started, context.code() or grpc.StatusCode.OK)
            return response
        finally:
            calls.leave()

    async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
        started = time.perf_counter()
        metrics.started.inc()
        if counted:
            calls.enter()
        try:
            if (refused := refusal(request, context)) is not None:
                raise refused
            responses = inner(incoming(request), context)
            if inspect.isawaitable(responses):
                # A handler that writes with context.write (health's Watch) and
                # returns nothing.
                if counted or policy.draining is None:
                    await responses
                else:
                    await _until(responses, policy.draining)
            else:
                async for item in responses:
                    if context.done():
                        # The client cancelled or went away: writing now fails inside
                        # grpc. Closing the handler withdraws its queued work.
                        break
                    metrics.sent.inc()
                    yield item
        except BaseException as exc:
            if not await _answer_error(exc, context, metrics, started):
                raise
        else:
            metrics.finish(started, context.code() or grpc.StatusCode.OK)
        finally:
            if counted:
                calls.leave()

    replaced: dict[str, Any] = {attr: stream if attr.endswith("_stream") else unary}
    if handler.request_deserializer is not None:
        replaced["request_deserializer"] = _tolerant(handler.request_deserializer)
    return handler._replace(**replaced)


async def _until(work: Any, event: asyncio.Event) -> None:
    """Run `work` until it ends or `event` is set, whichever comes first."""
    task: asyncio.Future[Any] = asyncio.ensure_future(work)
    waiting = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        task.cancel()  # nothing if it is over
        await asyncio.gather(task, return_exceptions=True)
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error


class _Unauthenticated(Pt2ServeError):
    """Refused before the handler ran; maps to UNAUTHENTICATED (service layer only)."""


class Forwarded(Pt2ServeError):
    """Another process's answer to a forwarded call, passed on with its own status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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


async def _checked(requests: AsyncIterator[Any], received: Any) -> AsyncIterator[Any]:
    async for request in requests:
        received.inc()
        if isinstance(request, _Undecodable):
            raise request.refusal()
        yield request


async def _answer_error(exc: BaseException, context: Context, metrics: MethodMetrics, started: float) -> bool:
    """Count how the call ended. A domain error is answered with its status (raising
    grpc's AbortError) unless the call is over already; returns False for any other
    error, which the caller re-raises."""
    if not isinstance(exc, Pt2ServeError):
        metrics.finish(started, _code_of(exc, context))
        return False
    metrics.finish(started, _status(exc))
    if not context.done():  # nobody is left to tell once the call has ended
        await context.abort(_status(exc), message_of(exc))
    return True


def _status(error: Pt2ServeError) -> grpc.StatusCode:
    if isinstance(error, Forwarded):
        return error.code
    return grpc.StatusCode.UNAUTHENTICATED if isinstance(error, _Unauthenticated) else status_of(error)


def _code_of(exc: BaseException, context: Context) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
