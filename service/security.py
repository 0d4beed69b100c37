"""Authorization for management RPCs and TLS credentials.

Inference stays open to anyone who can reach the port (put it behind TLS, mTLS or a
network policy); the calls that change what the server runs or reads — loading and
unloading models, constant updates, reading packages by path — need the management
bearer token when one is configured.
"""

from __future__ import annotations

import hmac
import os
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# Fully qualified method names that need the management token.
MANAGEMENT_METHODS = frozenset(
    {
        "/pt2serve.v1.ModelLoader/LoadModel",
        "/pt2serve.v1.ModelLoader/UnloadModel",
        "/pt2serve.v1.ModelLoader/LoadConstants",
        "/pt2serve.v1.ModelLoader/LoadConstantsFromFile",
        "/pt2serve.v1.ModelLoader/UpdateConstantBuffer",
        "/pt2serve.v1.ModelLoader/SwapConstantBuffer",
        "/pt2serve.v1.ModelLoader/LoadMetadataFromPackage",
        "/inference.GRPCInferenceService/RepositoryModelLoad",
        "/inference.GRPCInferenceService/RepositoryModelUnload",
    }
)
TOKEN_ENV = "PT2SERVE_MANAGEMENT_TOKEN"


def read_token(path: str | None) -> str | None:
    """The management token: from `path` if given, else $PT2SERVE_MANAGEMENT_TOKEN."""
    if path:
        token = pathlib.Path(path).read_text().strip()
        if not token:
            raise ValueError(f"management token file {path!r} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


class ManagementAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """UNAUTHENTICATED for management calls without `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in MANAGEMENT_METHODS:
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _refusal(handler, handler_call_details.method)

    def _authorized(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False


def _refusal(handler: Any, method: str) -> Any:
    message = f"{method} needs the management token (metadata 'authorization: Bearer <token>')"

    async def refuse_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=refuse_unary)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=refuse_unary)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    field = "unary_stream" if handler.unary_stream is not None else "stream_stream"
    return handler._replace(**{field: refuse_stream})


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None) -> grpc.ServerCredentials:
    """TLS for the server; with a client CA, mutual TLS (clients must present a cert it signed)."""
    pair = (pathlib.Path(key_file).read_bytes(), pathlib.Path(cert_file).read_bytes())
    ca = pathlib.Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(
    *,
    tls: bool,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    token: str | None = None,
) -> grpc.ChannelCredentials | None:
    """Credentials for a client channel, or None for plain text without a token.

    The token travels as `authorization: Bearer <token>`. gRPC sends call
    credentials only over TLS or to a local address, so without TLS a token can
    only be used against a server on this machine.
    """

    def read(path: str | None) -> bytes | None:
        return pathlib.Path(path).read_bytes() if path else None

    if tls:
        channel = grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
    elif token:
        channel = grpc.local_channel_credentials()
    else:
        return None
    if token:
        return grpc.composite_channel_credentials(channel, grpc.access_token_call_credentials(token))
    return channel
