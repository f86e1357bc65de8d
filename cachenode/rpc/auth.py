"""Bearer-token checks shared by the gRPC interceptor and the HTTP server."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"


def load_token(path: str | Path) -> str:
    """Read a token file; raise ValueError (one line) when it is unusable."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read --auth-token-file {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"--auth-token-file {path} is empty")
    return token


def bearer_ok(header_value: str | None, token: str) -> bool:
    if not header_value or not header_value.startswith("Bearer "):
        return False
    return hmac.compare_digest(header_value[len("Bearer ") :].strip().encode(), token.encode())


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Rejects every call without the pool's token, except the standard health service."""

    def __init__(self, token: str) -> None:
        self._token = token

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream_in = grpc.stream_unary_rpc_method_handler(deny)
        self._deny_stream_out = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(HEALTH_SERVICE_PREFIX):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_ok(metadata.get("authorization"), self._token):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and not handler.response_streaming:
            return self._deny_stream_in
        if handler.response_streaming and not handler.request_streaming:
            return self._deny_stream_out
        return self._deny_unary
