"""TLS for the node's three ports (gRPC, data channel, HTTP) and for clients.

The operator mounts a Secret's tls.crt / tls.key and sets KVPOOL_TLS_CERT_FILE / KEY_FILE;
clients reach such a pool with a grpcs:// URL and trust its CA via KVPOOL_TLS_CA_FILE.

Certificates are renewed under a running server (cert-manager rewrites the Secret, the kubelet
swaps the mounted files through a symlink), so a server never keeps a copy for life: `ServerTLS`
looks at the files again (at most once a second, on new connections) and new handshakes use the
new pair; connections already open keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

RELOAD_CHECK_S = 1.0
"""How often, at most, new connections look at the certificate files (a stat of each)."""


class ServerTLS:
    """A server certificate and key that follow their files; `context` and `current()` are what
    new connections should use now. A renewed pair that does not load keeps the old one in use."""

    def __init__(self, cert_file: str | Path, key_file: str | Path, check_every: float = RELOAD_CHECK_S):
        """Read and check the pair; ValueError with a one-line reason."""
        self.cert_file, self.key_file = Path(cert_file), Path(key_file)
        self._check_every = check_every
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._files = _identity(self.cert_file, self.key_file)
        self._cert_pem = _read(self.cert_file, "--tls-cert-file")
        self._key_pem = _read(self.key_file, "--tls-key-file")
        self._context = _server_context(self.cert_file, self.key_file)
        self.generation = 0

    @property
    def context(self) -> ssl.SSLContext:
        """The SSLContext for the next server-side handshake (HTTP, data channel)."""
        self.refresh()
        return self._context

    @property
    def cert_pem(self) -> bytes:
        return self.current()[2]

    @property
    def key_pem(self) -> bytes:
        return self.current()[1]

    def current(self) -> tuple[int, bytes, bytes]:
        """(generation, key PEM, certificate PEM) for the next handshake (gRPC's credentials)."""
        self.refresh()
        with self._lock:
            return self.generation, self._key_pem, self._cert_pem

    def refresh(self) -> bool:
        """Load the files again if they changed since the last look; whether a new pair is in use.
        Cheap when nothing changed: two stats, at most once per `check_every`."""
        now = time.monotonic()
        if now - self._checked_at < self._check_every:
            return False
        with self._lock:
            if now - self._checked_at < self._check_every:
                return False
            self._checked_at = now
            files = _identity(self.cert_file, self.key_file)
            if files == self._files:
                return False
            self._files = files  # a pair that fails to load is tried again when the files change again
            try:
                cert_pem = _read(self.cert_file, "--tls-cert-file")
                key_pem = _read(self.key_file, "--tls-key-file")
                if (cert_pem, key_pem) == (self._cert_pem, self._key_pem):
                    return False
                context = _server_context(self.cert_file, self.key_file)
            except ValueError as exc:
                log.warning("keeping the current TLS certificate: %s", exc)
                return False
            self._cert_pem, self._key_pem, self._context = cert_pem, key_pem, context
            self.generation += 1
        log.info("loaded a renewed TLS certificate from %s", self.cert_file)
        return True


def load_server_tls(cert_file: str | Path, key_file: str | Path) -> ServerTLS:
    """Read and check a certificate chain and key; ValueError with a one-line reason."""
    return ServerTLS(cert_file, key_file)


def client_context(ca_file: str | Path | None) -> ssl.SSLContext:
    """Verify the server against `ca_file`, or the system's roots when None."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def read_ca(ca_file: str | Path | None) -> bytes | None:
    return _read(ca_file, "--tls-ca-file") if ca_file else None


def _server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"--tls-cert-file/--tls-key-file are not a usable pair: {exc}") from None
    return context


def _identity(*paths: Path) -> tuple:
    """What changes when a file is replaced or rewritten: the target's inode, size and mtime
    (stat follows the kubelet's symlinks to the files it swapped in)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append(None)
            continue
        out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _read(path: str | Path, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {flag} {path}: {exc.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{flag} {path} is not a PEM file")
    return data
