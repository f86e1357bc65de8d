"""What the shared-tier fault tests under a `kvpool up` node process share: the client (over the
TCP data channel, or NIXL where it loads), chunks of about 1 MiB, waits on observable state (never
a sleep as proof), and the checks issue 22 item 5 asks after a fault.

The deadlines are generous guards against a hang on a loaded 2-core machine, not timing claims:
every wait ends as soon as the state it waits for is seen.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping

from kvpool.cachenode import Client
from kvpool.cachenode.client.nixl_common import load_nixl
from kvpool.cachenode.core.errors import NixlUnavailable

from ..needs import missing

MiB = 1 << 20
WAIT_S = 60.0  # past the breaker's longest back-off (10 s) several times over
CLIENT_TIMEOUT_S = 30.0  # a call that fails fails for a reason other than a slow machine
TRANSPORTS = ["tcp", "nixl"]


def chunks(prefix: str, n: int) -> dict[bytes, bytes]:
    """n random values of 1 MiB and a few bytes (so that no two share a size), 32-byte keys."""
    return {f"{prefix}-{i:03d}".encode().ljust(32, b"."): os.urandom(MiB + i) for i in range(n)}


def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def node_client(url: str, transport: str) -> Iterator[Client]:
    """ "tcp": the data channel only. "nixl": the default transport ("auto"), once NIXL is set up
    (a request NIXL cannot serve, e.g. a read larger than L1, falls back to the data channel)."""
    if transport == "tcp":
        with Client(url, timeout=CLIENT_TIMEOUT_S, transport="grpc") as client:
            yield client
        return
    try:
        load_nixl()
    except NixlUnavailable as exc:
        missing(f"nixl is not importable here ({exc}); scripts/install.sh test installs it")
    with Client(url, timeout=CLIENT_TIMEOUT_S) as client:
        client.stats()  # connects; NIXL is set up in the background from here
        wait_for(lambda: client.transport_in_use.startswith("nixl"), "the client's NIXL set-up")
        yield client


def exact(got: Mapping[bytes, bytes], sent: Mapping[bytes, bytes]) -> int:
    """Assert that every value read is its own key's bytes (misses allowed); return the hits."""
    wrong = [k for k, v in got.items() if sent.get(k) != v]
    assert not wrong, f"{len(wrong)} values read back wrong: {wrong[:3]}"
    return len(got)


def tier(client: Client, name: str) -> dict:
    """A tier's stats as its one node reports them (the pool's sum carries no breaker state)."""
    (node,) = client.stats()["nodes"].values()
    return node["tiers"][name]


def wait_unpinned(client: Client) -> dict:
    """The node's stats once nothing is pinned and no lease is out (a NIXL get's lease ends when
    the node reads the client's notification, after the client's call has returned)."""
    stats: dict = {}

    def unpinned() -> bool:
        nonlocal stats
        stats = client.stats()
        return stats["pinned_bytes"] == 0 and stats["leases"] == 0

    wait_for(unpinned, "pinned bytes and leases back to 0")
    return stats


def assert_unpinned_and_within_budget(client: Client) -> dict:
    """Issue 22 item 5 after a fault: 0 pinned bytes, no lease left and none ended by expiry,
    memory use within its capacity."""
    stats = wait_unpinned(client)
    memory = stats["tiers"]["memory"]
    assert memory["used"] <= memory["capacity"], memory
    assert stats["leases_expired"] == 0, stats["leases_expired"]
    return stats
