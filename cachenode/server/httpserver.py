"""The HTTP port of every server: /metrics (Prometheus), /healthz (alive), /readyz (ready), plus
any JSON routes a server adds (the lookup service's /scores)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from kvpool.cachenode.rpc.auth import bearer_ok
from kvpool.cachenode.rpc.tls import ServerTLS

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024

# A route answers (status, body, content type) for (request body, query string).
Route = Callable[[bytes, str], tuple[int, bytes, str]]


class HealthServer:
    """A small threaded HTTP server; `ready` is asked on every /readyz."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        token: str | None = None,
        tls: ServerTLS | None = None,
        routes: Mapping[tuple[str, str], Route] | None = None,
        not_ready: str = "rebuilding the disk index",
    ) -> None:
        """`routes` maps (method, path) to a handler; they need the bearer token like /metrics."""
        handler = _make_handler(ready, token, dict(routes or {}), not_ready)
        self._server = (
            _TLSHTTPServer((host, port), handler, tls) if tls else ThreadingHTTPServer((host, port), handler)
        )
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvpool-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _TLSHTTPServer(ThreadingHTTPServer):
    """HTTPS; the handshake runs in the request's thread, so a slow client cannot stall accept().
    Each connection takes the certificate in use now (renewed files are picked up)."""

    def __init__(self, address, handler, tls: ServerTLS) -> None:
        self._tls = tls
        super().__init__(address, handler)

    def get_request(self):
        sock, address = super().get_request()
        return self._tls.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


def _make_handler(
    ready: Callable[[], bool], token: str | None, routes: dict[tuple[str, str], Route], not_ready: str
) -> type[BaseHTTPRequestHandler]:
    known = ", ".join(["/metrics", "/healthz", "/readyz", *sorted({p for _, p in routes})])

    class Handler(BaseHTTPRequestHandler):
        server_version = "kvpool"
        timeout = 10

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            if path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                if ready():
                    self._send(200, b"ready\n")
                else:
                    self._send(503, f"not ready: {not_ready}\n".encode())
            elif path == "/metrics":
                if self._authorized():
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            else:
                self._route("GET", path, query, b"")

        def do_POST(self) -> None:
            path, _, query = self.path.partition("?")
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:
                self._send(413 if length > 0 else 400, f"body must be 0..{MAX_BODY_BYTES} bytes\n".encode())
                return
            self._route("POST", path, query, self.rfile.read(length))

        def _route(self, method: str, path: str, query: str, body: bytes) -> None:
            route = routes.get((method, path))
            if route is None:
                allowed = [m for m, p in routes if p == path]
                if allowed:
                    self._send(405, f"{path} takes {', '.join(allowed)}\n".encode())
                else:
                    self._send(404, f"not found; try {known}\n".encode())
                return
            if self._authorized():
                self._send(*route(body, query))

        def _authorized(self) -> bool:
            if token and not bearer_ok(self.headers.get("Authorization"), token):
                self._send(401, b"missing or wrong bearer token\n")
                return False
            return True

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            log.debug("http %s", format % args)

    return Handler
