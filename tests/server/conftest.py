"""Fixtures that run real `kvpool up` processes on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvpool.cachenode import Client
from kvpool.cli.local_servers import free_port


@dataclass
class NodeProcess:
    proc: subprocess.Popen
    url: str
    http_port: int

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, **kwargs) -> Client:
        return Client(self.url, **kwargs)

    def hello(self):
        with self.client() as c:
            return c.hello()

    def kill(self) -> None:
        """SIGKILL: no flush, no goodbye."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def run_node(*args: str) -> Iterator[NodeProcess]:
    http_port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "kvpool.cli.main",
        "up",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",
        str(http_port),
        "--data-port",
        "0",
        "--memory",
        "256MiB",
        "--log-level",
        "warning",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("grpc://"), f"kvpool up did not print its URL (exit {proc.poll()})"
        yield NodeProcess(proc, url, http_port)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with run_node("--max-value-size", "16MiB", "--max-batch-keys", "64") as n:
        yield n
