"""Fixtures that run real `kvpool up` processes on free loopback ports."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import free_port, kvpool_up


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
    """A `kvpool up` process with 256 MiB of memory and a known HTTP port."""
    http_port = free_port()
    with kvpool_up("--http-port", str(http_port), "--memory", "256MiB", *args) as (proc, url):
        yield NodeProcess(proc, url, http_port)


@pytest.fixture(scope="module")
def node() -> Iterator[NodeProcess]:
    with run_node("--max-value-size", "16MiB", "--max-batch-keys", "64") as n:
        yield n
