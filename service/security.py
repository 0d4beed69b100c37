"""Authorization for management RPCs and TLS credentials.

Inference stays open to anyone who can reach the port (put it behind TLS, mTLS or a
network policy); the calls that change what the server runs or reads — loading and
unloading models, constant updates, reading packages by path — need the management
bearer token when one is configured.
"""

from __future__ import annotations

import os
import pathlib

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
        "/pt2serve.v1.ModelLoader/DiscardStagedConstants",
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
