"""The one way a client opens a gRPC channel to a kvpool server, and says who it is.

Every client (pool connections, the agent and lookup clients, the publisher, a node's links to
its peers) comes through here, so the CA a grpcs:// URL trusts is found the same way everywhere:
the file given, else env KVPOOL_TLS_CA_FILE, else the system's roots. Each caller keeps its own
channel options (message sizes, reconnect back-off).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence

import grpc

from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.urls import parse_url
from kvpool.cachenode.rpc.tls import client_context, read_ca

CA_FILE_ENV = "KVPOOL_TLS_CA_FILE"

Metadata = tuple[tuple[str, str], ...]
ChannelOptions = Sequence[tuple[str, object]]


def ca_file(tls_ca_file: str | None = None) -> str | None:
    """The CA bundle a TLS client trusts: `tls_ca_file`, else env KVPOOL_TLS_CA_FILE, else None
    (the system's roots)."""
    return tls_ca_file or os.environ.get(CA_FILE_ENV) or None


def root_certificates(tls_ca_file: str | None = None) -> bytes | None:
    """The PEM roots gRPC verifies servers with (None: the system's); InvalidRequest for a
    bundle that cannot be read."""
    try:
        return read_ca(ca_file(tls_ca_file))
    except (ValueError, OSError) as exc:
        raise InvalidRequest(str(exc)) from None


def trust(tls_ca_file: str | None = None) -> tuple[bytes | None, ssl.SSLContext]:
    """The roots for gRPC and an SSL context for the data channel, from `ca_file`'s bundle;
    InvalidRequest for a bundle that cannot be read."""
    path = ca_file(tls_ca_file)
    try:
        return read_ca(path), client_context(path)
    except (ValueError, OSError, ssl.SSLError) as exc:
        raise InvalidRequest(str(exc)) from None


def bearer_metadata(token: str | None) -> Metadata:
    """The call metadata that carries a bearer token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_channel(
    host: str,
    port: int,
    *,
    tls: bool,
    options: ChannelOptions = (),
    root_certificates: bytes | None = None,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to host:port. With TLS, `root_certificates` (None: the system's roots) verify
    the server, under `server_name` when `host` is an address a name resolved to."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    options = list(options)
    if not tls:
        return grpc.insecure_channel(target, options=options)
    if server_name and server_name != host:
        options.append(("grpc.ssl_target_name_override", server_name))
    credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return grpc.secure_channel(target, credentials, options=options)


def open_url(url: str, options: ChannelOptions = (), tls_ca_file: str | None = None) -> grpc.Channel:
    """A channel to grpc://host:port or grpcs://host:port (the CA as `ca_file` finds it)."""
    host, port, tls = parse_url(url)
    root = root_certificates(tls_ca_file) if tls else None
    return open_channel(host, port, tls=tls, options=options, root_certificates=root)
