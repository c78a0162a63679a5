"""The single table between ultramem-dist errors and gRPC status codes.

Servers abort with :func:`status_for`; clients turn a status back into a typed error with
:func:`error_for`.
"""

from __future__ import annotations

import grpc

from ultramem_dist.errors import (
    InvalidRequestError,
    RemoteError,
    ShardUnavailableError,
    TableNotFoundError,
    UltraMemError,
    VersionMismatchError,
)

__all__ = ["code_for_number", "error_for", "status_for"]

# error class -> status code (server side). Order matters only for subclasses (none today).
_ERROR_TO_STATUS: tuple[tuple[type[UltraMemError], grpc.StatusCode], ...] = (
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (TableNotFoundError, grpc.StatusCode.NOT_FOUND),
    (VersionMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (ShardUnavailableError, grpc.StatusCode.UNAVAILABLE),
)

# status code -> error class (client side); anything else is a RemoteError.
_STATUS_TO_ERROR: dict[grpc.StatusCode, type[UltraMemError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: TableNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: VersionMismatchError,
    grpc.StatusCode.UNAVAILABLE: ShardUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: ShardUnavailableError,
    grpc.StatusCode.CANCELLED: ShardUnavailableError,
}


_CODE_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def code_for_number(number: int) -> grpc.StatusCode:
    """The status code with wire number ``number`` (as a GatherStream reply carries it);
    UNKNOWN for a number gRPC does not define."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """Status code a server answers for ``exc`` (INTERNAL for anything unexpected)."""
    for cls, code in _ERROR_TO_STATUS:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode, message: str) -> UltraMemError:
    """Typed client-side error for a failed call's status."""
    return _STATUS_TO_ERROR.get(code, RemoteError)(message)
