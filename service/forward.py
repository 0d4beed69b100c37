"""Which RPCs a front end serves itself, and how it forwards the others to the
engine: the call's bytes as they came, its metadata and deadline; the engine's
answer or status back unchanged."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
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


# Client-stream messages buffered on their way to the engine (at most a few MiB:
# LoadConstants sends 1 MiB chunks).
FEED_DEPTH = 4
POLL_S = 0.05


def served_here(method: str) -> bool:
    return method in LOCAL_METHODS or method.startswith(LOCAL_PREFIX)


def _forwarded_metadata(context: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in context.invocation_metadata() or () if not k.startswith(":")]


def forwarding(
    method: str,
    handler: Any,
    channel_of: Callable[[], grpc.aio.Channel | None],
    blocking_of: Callable[[], grpc.Channel | None],
) -> Any:
    """A handler of `handler`'s kind that passes the call's bytes to the engine and
    its answer (or status) back: on `channel_of()`, or for client streams on the
    blocking `blocking_of()`."""

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
        # gRPC's asyncio client turns a write that races the engine's answer (a
        # refusal after the first message) into INTERNAL, hiding the engine's status;
        # its blocking client does not. So a client stream is passed on by a blocking
        # call on a worker thread, fed through a small queue.
        blocking = blocking_of()
        if blocking is None:
            raise Unavailable("the server is starting")
        feed: queue.Queue[bytes | None] = queue.Queue(maxsize=FEED_DEPTH)
        over = threading.Event()  # the engine answered, or the client went away

        def messages() -> Iterator[bytes]:  # on gRPC's thread
            while True:
                try:
                    message = feed.get(timeout=POLL_S)
                except queue.Empty:
                    if over.is_set():
                        return
                    continue
                if message is None:
                    return
                yield message

        def put(message: bytes | None) -> bool:  # on a worker thread
            while not over.is_set():
                try:
                    feed.put(message, timeout=POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        forwarded = blocking.stream_unary(method, None, None).future(messages(), **call_options(context))
        forwarded.add_done_callback(lambda _: over.set())
        try:
            async for message in requests:
                if not await asyncio.to_thread(put, message):
                    break  # answered before the client's stream ended
            else:
                await asyncio.to_thread(put, None)
            answer: bytes = await asyncio.to_thread(forwarded.result)
            return answer
        except grpc.RpcError as exc:
            raise Forwarded(exc.code(), exc.details() or "") from None
        finally:
            over.set()
            forwarded.cancel()  # type: ignore[no-untyped-call]  # nothing if over; else the client left

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
