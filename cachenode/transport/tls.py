"""TLS for the node's three ports (gRPC, data channel, HTTP) and for clients.

The operator mounts a Secret's tls.crt / tls.key and sets KVPOOL_TLS_CERT_FILE / KEY_FILE;
clients reach such a pool with a grpcs:// URL and trust its CA via KVPOOL_TLS_CA_FILE.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerTLS:
    cert_pem: bytes
    key_pem: bytes
    context: ssl.SSLContext


def load_server_tls(cert_file: str | Path, key_file: str | Path) -> ServerTLS:
    """Read and check a certificate chain and key; ValueError with a one-line reason."""
    cert_pem = _read(cert_file, "--tls-cert-file")
    key_pem = _read(key_file, "--tls-key-file")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--tls-cert-file/--tls-key-file are not a usable pair: {exc}") from None
    return ServerTLS(cert_pem, key_pem, context)


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """Verify the server against `ca_file`, or the system's roots when None."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def read_ca(ca_file: str | Path | None) -> bytes | None:
    return _read(ca_file, "--tls-ca-file") if ca_file else None


def _read(path: str | Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{flag} {path} is not a PEM file")
    return data
