"""Real node processes with NIXL on (UCX over loopback), and helpers to read their leases."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Iterator

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.client.nixl_common import load_nixl
from kvpool.cachenode.core.errors import NixlUnavailable
from kvpool.cli.devtools.local_servers import free_port, kvpool_up

from ..needs import missing

LEASE_TTL_S = 5.0


def nixl_or_skip() -> None:
    """Skip without NIXL locally; fail under CI, whose scripts/install.sh test installs the wheel."""
    try:
        load_nixl()
    except NixlUnavailable as exc:
        missing(f"nixl is not importable here ({exc}); scripts/install.sh test installs it")


class NixlNode:
    def __init__(self, proc, url: str, http_port: int) -> None:
        self.proc = proc
        self.url = url
        self.http_port = http_port

    def client(self, **kwargs) -> Client:
        kwargs.setdefault("transport", "nixl")
        return Client(self.url, **kwargs)

    def stats(self) -> dict:
        with Client(self.url, transport="grpc") as c:
            return c.stats()

    def pinned_metric(self) -> float:
        body = urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5).read().decode()
        (line,) = [ln for ln in body.splitlines() if ln.startswith("kvpool_pinned_bytes ")]
        return float(line.split()[1])

    def wait_unpinned(self, timeout: float = 3 * LEASE_TTL_S + 5) -> dict:
        """Stats once no lease is left (notifications and sweeps are asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if (stats["pinned_bytes"] == 0 and stats["leases"] == 0) or time.monotonic() > deadline:
                return stats
            time.sleep(0.05)


@contextlib.contextmanager
def nixl_node(*args: str) -> Iterator[NixlNode]:
    http_port = free_port()
    with kvpool_up(
        "--http-port", str(http_port), "--nixl", "on", "--nixl-lease-ttl", str(LEASE_TTL_S), *args
    ) as (proc, url):
        node = NixlNode(proc, url, http_port)
        yield node
        if proc.poll() is None:  # every NIXL test ends with nothing pinned
            stats = node.wait_unpinned()
            assert stats["pinned_bytes"] == 0 and stats["leases"] == 0, stats
            assert node.pinned_metric() == 0


@pytest.fixture(scope="module")
def node() -> Iterator[NixlNode]:
    nixl_or_skip()
    with nixl_node("--memory", "384MiB", "--max-value-size", "64MiB") as n:
        yield n


@pytest.fixture
def unpinned_after(node) -> Iterator[None]:
    """Each test leaves no lease behind."""
    yield
    stats = node.wait_unpinned()
    assert stats["pinned_bytes"] == 0 and stats["leases"] == 0, stats
    assert node.pinned_metric() == 0
