"""Which RPCs a front end serves itself, and how it forwards the others to the
engine: the call's bytes as they came, its metadata and deadline; the engine's
answer or status back unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from pt2serve.loader.errors import Unavailable
from pt2serve.service.calls import Forwarded

# The RPCs a front end serves itself; every other one is forwarded to the engine.
LOCAL_METHODS = frozenset(
    {
        "/pt2serve.v1.Inference/Run",
        "/pt2serve.v1.Inference/RunStream",
        "/inference.GRPCInferenceService/ModelInfer",
        "/inference.GRPCInferenceService/ModelStreamInfer",
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)
# Health and reflection (grpc.health.v1, grpc.reflection.v1alpha) are answered here.
LOCAL_PREFIX = "/grpc."


def served_here(method: str) -> bool:
    return method in LOCAL_METHODS or method.startswith(LOCAL_PREFIX)


def _forwarded_metadata(context: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith(":")]


def forwarding(method: str, handler: Any, channel_of: Callable[[], grpc.aio.Channel | None]) -> Any:
    """A handler of `handler`'s kind that passes the call's bytes to the engine and
    its answer (or status) back."""

    def call_options(context: Any) -> dict[str, Any]:
        return {"metadata": _forwarded_metadata(context), "timeout": context.time_remaining()}

    def channel() -> grpc.aio.Channel:
        found = channel_of()
        if found is None:
            raise Unavailable("the server is starting")
        return found

    async def unary_unary(request: bytes, context: Any) -> bytes:
        try:
            answer: bytes = await channel().unary_unary(method, None, None)(request, **call_options(context))
        except grpc.aio.AioRpcError as exc:
            raise Forwarded(exc.code(), exc.details() or "") from None
        return answer

    async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
        try:
            answer: bytes = await channel().stream_unary(method, None, None)(
                requests, **call_options(context)
            )
        except grpc.aio.AioRpcError as exc:
            raise Forwarded(exc.code(), exc.details() or "") from None
        return answer

    async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            async for answer in channel().unary_stream(method, None, None)(request, **call_options(context)):
                yield answer
        except grpc.aio.AioRpcError as exc:
            raise Forwarded(exc.code(), exc.details() or "") from None

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary_unary)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(stream_unary)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(unary_stream)
    raise TypeError(f"{method}: forwarding a bidirectional stream is not supported")
