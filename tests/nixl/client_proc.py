"""A client process for the NIXL tests: `roundtrip URL SEED` or `hold URL KEY` (run with -P)."""

from __future__ import annotations

import random
import sys
import time

from kvpool.cachenode import Client
from kvpool.cachenode.rpc.proto import nixl_pb2 as pb

SIZES = [1, 4095, 4096, 65_537, 1 << 20, 3 * (1 << 20) + 5, 8 << 20]


def route_of(client: Client):
    """The NIXL route of a one-node pool's only member (a test looks inside)."""
    (member,) = client._ensure_members().values()
    return member.conn._nixl


def roundtrip(url: str, seed: int) -> None:
    """Put values of many sizes over NIXL, read them back every way, compare bytes."""
    rnd = random.Random(seed)
    values = {f"proc-{seed}-{i}".encode(): rnd.randbytes(size) for i, size in enumerate(SIZES)}
    with Client(url, transport="nixl") as client:
        for _ in range(3):
            client.put_many(values)
            got = client.get_many([*values, b"proc-missing"])
            assert set(got) == set(values), sorted(set(values) ^ set(got))
            assert all(got[k] == v for k, v in values.items()), "bytes differ"
            into = client.get_many_into(list(values))
            assert all(bytes(into[k].view) == v for k, v in values.items()), "pooled bytes differ"
            for buf in into.values():
                buf.release()
        print("ok", client.transport_in_use, flush=True)


def hold(url: str, key: bytes) -> None:
    """Take a get lease on `key` and a put reservation, WRITE half of the value, then hang
    without reading, committing or releasing: the test kills this process here."""
    with Client(url, transport="nixl") as client:
        link = route_of(client).link
        got = link._rpc(link._stub.NixlGet, pb.NixlGetRequest(keys=[key], agent_name=link.node_agent))
        entry = pb.NixlPutEntry(key=b"never-committed", size=1 << 20)
        put = link._rpc(
            link._stub.NixlReserve, pb.NixlReserveRequest(entries=[entry], agent_name=link.node_agent)
        )
        half = client.buffers.acquire(1 << 19)
        half.view[:] = b"h" * (1 << 19)
        link._transfer(
            "WRITE",
            local=[(link._pool_base + half.offset, 1 << 19, 0)],
            remote=[(put.addresses[0], 1 << 19, 0)],
            notify=b"",
            deadline=time.monotonic() + 30,
        )
        print("held", got.lease_id, put.lease_id, flush=True)
        time.sleep(3600)


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    if mode == "roundtrip":
        roundtrip(url, int(sys.argv[3]))
    else:
        hold(url, sys.argv[3].encode())
