"""The node's HTTP port: /metrics (Prometheus), /healthz (alive), /readyz (disk index rebuilt)."""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from .auth import bearer_ok

log = logging.getLogger("kvpool.node.http")


class HealthServer:
    """A small threaded HTTP server; `ready` is asked on every /readyz."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool],
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        handler = _make_handler(ready, token)
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
    """HTTPS; the handshake runs in the request's thread, so a slow client cannot stall accept()."""

    def __init__(self, address, handler, context: ssl.SSLContext) -> None:
        self._context = context
        super().__init__(address, handler)

    def get_request(self):
        sock, address = super().get_request()
        return self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


def _make_handler(ready: Callable[[], bool], token: str | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kvpool"
        timeout = 10

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                if ready():
                    self._send(200, b"ready\n")
                else:
                    self._send(503, b"not ready: rebuilding the disk index\n")
            elif path == "/metrics":
                if token and not bearer_ok(self.headers.get("Authorization"), token):
                    self._send(401, b"missing or wrong bearer token\n")
                    return
                self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found; try /metrics, /healthz or /readyz\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:
            log.debug("http %s", format % args)

    return Handler
