"""Valkey SIGKILLed and restarted under a `kvpool up` node process (issue 22, item 5): the node
keeps serving what its memory holds, reads of what only Valkey held are misses (never errors,
never wrong bytes), the tier's breaker opens, and once Valkey is back on its port the breaker
closes and new values are written through to it again."""

from __future__ import annotations

import os
import time

from kvpool.cachenode import Client
from kvpool.cli.devtools.local_servers import kvpool_up

MiB = 1 << 20


def chunks(prefix: str, n: int) -> dict[bytes, bytes]:
    return {f"{prefix}-{i:03d}".encode().ljust(32, b"."): os.urandom(MiB + i) for i in range(n)}


def wait(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def redis_tier(client: Client) -> dict:
    return client.stats()["tiers"]["redis"]


def test_valkey_killed_and_restarted_under_a_node(own_valkey):
    early, late = chunks("early", 12), chunks("late", 4)
    args = ("--redis-url", own_valkey.url, "--pool-name", "vkfault", "--memory", "8MiB")
    with kvpool_up(*args) as (_proc, url), Client(url, timeout=5) as client:
        client.put_many(early)  # 12 MiB through 8 MiB of memory: the first ones live only in Valkey
        raw = own_valkey.client()
        wait(lambda: len(raw.keys("kvpool:vkfault:*")) >= len(early), "the write-through to Valkey")
        got = client.get_many(list(early))
        assert got == early  # memory and Valkey together hold every value
        own_valkey.kill()
        got = client.get_many(list(early))  # what only Valkey held: misses, not errors
        assert all(got[k] == early[k] for k in got) and len(got) < len(early)
        client.put_many(late)  # the node takes writes while its shared tier is down
        assert client.get_many(list(late)) == late
        wait(lambda: redis_tier(client)["degraded"], "the breaker to open")
        own_valkey.start()  # back on its port, empty
        more = chunks("more", 2)
        wait(lambda: not redis_tier(client)["degraded"], "the breaker to close", timeout=60)
        client.put_many(more)
        raw = own_valkey.client()
        names = [b"kvpool:vkfault:c:" + key.hex().encode() for key in more]  # the tier's head of each value
        wait(lambda: raw.exists(*names) == len(more), "new values written through again")
        assert client.get_many(list(more)) == more
        stats = client.stats()
    memory = stats["tiers"]["memory"]
    assert memory["used"] <= memory["capacity"] and stats["pinned_bytes"] == 0
