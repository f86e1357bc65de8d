"""Building and binding a gRPC server the way every kvpool server does (auth, TLS, limits)."""

from __future__ import annotations

from concurrent import futures

import grpc

from kvpool.cachenode.rpc.auth import BearerTokenInterceptor
from kvpool.cachenode.rpc.tls import ServerTLS


def new_grpc_server(workers: int, token: str | None, message_limit: int, thread_prefix: str) -> grpc.Server:
    interceptors = [BearerTokenInterceptor(token)] if token else []
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_prefix),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", message_limit),
            ("grpc.max_send_message_length", message_limit),
            ("grpc.so_reuseport", 0),
        ],
    )


def bind(server: grpc.Server, host: str, port: int, tls: ServerTLS | None) -> int:
    """Bind host:port (0 = a free port); the bound port, or OSError when it is taken."""
    address = f"{grpc_host(host)}:{port}"
    if tls is not None:
        bound = server.add_secure_port(address, server_credentials(tls))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {port} on {host}")
    return bound


def server_credentials(tls: ServerTLS) -> grpc.ServerCredentials:
    """Credentials that follow renewed certificate files: gRPC asks the fetcher before each new
    connection's handshake, and it hands over a new pair only when `tls` loaded one."""
    generation, key, cert = tls.current()
    served = [generation]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        generation, key, cert = tls.current()
        if generation == served[0]:
            return None
        served[0] = generation
        return grpc.ssl_server_certificate_configuration([(key, cert)])

    return grpc.dynamic_ssl_server_credentials(
        grpc.ssl_server_certificate_configuration([(key, cert)]), fetch
    )


def grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def display_host(host: str) -> str:
    """What a client on this machine dials for a wildcard bind."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
