"""gRPC status codes ↔ kvpool errors, through the one table in `core/errors.py`.

Servers abort with `abort(context, error)`; clients turn a failed call into a KVPoolError with
`translate(exc)`. Neither names a status code itself.
"""

from __future__ import annotations

from typing import NoReturn

import grpc

from kvpool.cachenode.core.errors import KVPoolError, error_from_status, status_name


def status_code(error: BaseException) -> grpc.StatusCode:
    """The status a server answers `error` with."""
    return grpc.StatusCode[status_name(error)]


def abort(context: grpc.ServicerContext, error: BaseException, message: str | None = None) -> NoReturn:
    """End the call with `error`'s status; `message` (default: the error's text) is its detail."""
    context.abort(status_code(error), str(error) if message is None else message)
    raise AssertionError("context.abort returned")  # it raises; this keeps type checkers honest


def translate(exc: grpc.RpcError) -> KVPoolError:
    """The KVPoolError a client raises for a failed call."""
    code = exc.code() if hasattr(exc, "code") else None
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return error_from_status(code.name if code is not None else None, detail)
