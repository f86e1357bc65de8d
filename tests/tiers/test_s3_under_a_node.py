"""The S3 server stopped and started again under a `kvpool up` node process (issue 22, item 5).

While S3 is down the node serves what its memory holds; what only S3 held is a miss, never an
error and never wrong bytes; the tier's breaker opens; puts are acknowledged and kept in memory.
Once S3 is back on its port the breaker closes, new values are written to it again, and what it
held before the outage (moto keeps its objects across a stop, as S3 would) is read again, exact.
At the end nothing is pinned and memory use is within its budget.
"""

from __future__ import annotations

import pytest

from kvpool.cli.devtools.local_servers import kvpool_up

from .under_a_node import (
    TRANSPORTS,
    assert_unpinned_and_within_budget,
    chunks,
    exact,
    node_client,
    tier,
    wait_for,
    wait_unpinned,
)

PREFIX = "s3fault"


def objects_in_s3(server, bucket: str, keys) -> int:
    """How many of `keys` have their object in the bucket (listed from the server itself)."""
    names = {f"{PREFIX}/{key.hex()}" for key in keys}
    try:
        pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/")
        return sum(1 for page in pages for obj in page.get("Contents", ()) if obj["Key"] in names)
    except Exception:  # down: none
        return 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_s3_stopped_and_restarted_under_a_node(own_s3, transport):
    bucket = own_s3.new_bucket()
    early, late, more = chunks("early", 12), chunks("late", 4), chunks("more", 2)
    args = ("--s3-url", f"s3://{bucket}/{PREFIX}", "--s3-endpoint", own_s3.endpoint, "--pool-name", PREFIX,
            "--memory", "8MiB")  # fmt: skip
    with (
        kvpool_up(*args) as (_proc, url),
        node_client(url, transport) as client,
        node_client(url, "tcp") as tcp,
    ):
        client.put_many(early)  # 12 MiB through 8 MiB of memory: the first ones live only in S3
        wait_for(lambda: objects_in_s3(own_s3, bucket, early) == len(early), "the write-through to S3")
        assert client.get_many(list(early)) == early  # memory and S3 together hold every value
        recent = dict(list(early.items())[-6:])  # memory may be near empty after a read larger than it
        assert client.get_many(list(recent)) == recent
        wait_unpinned(client)

        own_s3.stop()
        got = tcp.get_many(list(early))  # the first read after the stop reaches the dead server
        assert exact(got, early) < len(early)  # what only S3 held: misses, not errors
        assert set(recent) <= set(got)
        # Right after, on the same connection, so that the node has let go of the read's values
        # (another connection's put may run while the read's thread still holds them, and L1
        # then evicts to make room: newest puts included).
        tcp.put_many(late)  # acknowledged while the shared tier is down
        assert client.get_many(list(late)) == late  # 4 MiB fits in 8 MiB: kept, all of them

        only_in_s3 = [k for k in early if k not in got]

        def breaker_open() -> bool:
            assert client.get_many(only_in_s3[:1]) == {}
            return tier(client, "s3")["breaker"] != "closed"

        wait_for(breaker_open, "the S3 tier's breaker to open")
        assert tier(client, "s3")["degraded"]

        own_s3.start()  # the same port; the objects written before the stop are still there
        client.put_many(more)  # queued; the breaker's next probe writes them
        wait_for(lambda: objects_in_s3(own_s3, bucket, more) == len(more), "new values written to S3 again")
        wait_for(lambda: tier(client, "s3")["breaker"] == "closed", "the breaker to close")
        assert not tier(client, "s3")["degraded"]
        assert client.get_many(list(more)) == more
        assert client.get_many(only_in_s3) == {k: early[k] for k in only_in_s3}  # S3's again, exact
        exact(client.get_many([*early, *late]), {**early, **late})
        assert_unpinned_and_within_budget(client)
