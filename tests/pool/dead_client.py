"""A client process the test kills mid-transfer (run with -P): `URL KEY LEASE_MS`.

It leases KEY's prefix over the data channel (pins it on the node), then starts a put of an
8 MiB value on a data-channel connection of its own, sends half of it, says "held" and hangs
without sending the rest: the node is left with a pin, a half-received value and a connection
that will never finish."""

from __future__ import annotations

import sys
import time

from kvpool.cachenode import Client
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.datachannel import DataConnection
from kvpool.cachenode.rpc import dataproto as dp

VALUE = 8 << 20


def main(url: str, key: bytes, lease_ms: int) -> None:
    with Client(url, timeout=5) as client:
        count, lease_id = client.lease_prefix([key], lease_ms)
        host, port = url.split("://")[1].rsplit(":", 1)
        hello = NodeConnection(host, int(port), ConnectOptions(timeout=5)).hello()
        conn = DataConnection(host, hello.data_port, hello.data_token, timeout=5)
        half = memoryview(b"h" * (VALUE // 2))
        dp.send_buffers(conn.sock, [dp.encode_put([(b"never-committed" + b"-" * 17, VALUE)]), half])
        print("held", count, lease_id, flush=True)
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]))
