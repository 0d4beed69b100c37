"""Domain errors shared by loader/ and scheduler/; framework-free.

Pt2ServeError            every error pt2serve raises on purpose; `kind` says how to map it
├── ModelNotFound        NOT_FOUND: no model by that name
├── ModelExists          ALREADY_EXISTS: the name is taken
├── PackageError         FAILED_PRECONDITION / NOT_FOUND: a package that cannot be read or loaded
├── InvalidInput         INVALID_ARGUMENT: a request that does not match the schema
├── AccessDenied         PERMISSION_DENIED: a path outside the model root
├── Unsupported          FAILED_PRECONDITION: the model cannot do this
├── Overloaded           RESOURCE_EXHAUSTED: the queue is full (scheduler)
├── Expired              DEADLINE_EXCEEDED: the deadline passed before execution (scheduler)
├── Unavailable          UNAVAILABLE: the model or server is shutting down (scheduler)
└── ExecutionFailed      INTERNAL: the runtime raised while running a validated batch
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    INVALID_ARGUMENT = "invalid_argument"
    PERMISSION_DENIED = "permission_denied"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class Pt2ServeError(Exception):
    kind: ErrorKind = ErrorKind.INTERNAL


class ModelNotFound(Pt2ServeError):
    kind = ErrorKind.NOT_FOUND


class ModelExists(Pt2ServeError):
    kind = ErrorKind.ALREADY_EXISTS


class PackageError(Pt2ServeError):
    kind = ErrorKind.FAILED_PRECONDITION


class PackageNotFound(PackageError):
    kind = ErrorKind.NOT_FOUND


class InvalidInput(Pt2ServeError):
    kind = ErrorKind.INVALID_ARGUMENT


class AccessDenied(Pt2ServeError):
    kind = ErrorKind.PERMISSION_DENIED


class Unsupported(Pt2ServeError):
    kind = ErrorKind.FAILED_PRECONDITION


class Overloaded(Pt2ServeError):
    kind = ErrorKind.RESOURCE_EXHAUSTED


class Expired(Pt2ServeError):
    kind = ErrorKind.DEADLINE_EXCEEDED


class Unavailable(Pt2ServeError):
    kind = ErrorKind.UNAVAILABLE


class ExecutionFailed(Pt2ServeError):
    kind = ErrorKind.INTERNAL


# Client-given values are echoed in messages at most this long: messages travel back
# in gRPC trailers, whose size is limited, and a log line should stay readable.
ECHO_LIMIT = 200


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """`value` quoted (repr) for an error message, cut to `limit` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str | bytes) else ""
    return f"{text[:limit]}…{size}"
