"""`kvpool up` runs a lookup service and its nodes publish to it, as a pool in Kubernetes does."""

from __future__ import annotations

import os

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cli.devtools.local_servers import kvpool_up

from .conftest import wait_until


@pytest.mark.parametrize("nodes", ["1", "2"])
def test_up_prints_its_lookup_service_and_the_nodes_publish_there(nodes: str) -> None:
    with kvpool_up("--nodes", nodes, "--memory", "64MiB") as (proc, url):
        line = proc.stdout.readline().strip()
        assert line.startswith("lookup service grpc://127.0.0.1:"), line
        lookup_url = line.split()[2]
        data = {f"up-{i}".encode(): os.urandom(5000) for i in range(8)}
        with Client(url, timeout=5) as client, LookupClient(lookup_url) as lookup:
            client.put_many(data)
            members = {m["node_id"] for m in client.members()}

            def located() -> bool:
                found = lookup.locate(list(data))
                return found.prefix == 8 and {m.info.holder_id for m in found.holders} <= members

            wait_until(located, what="the nodes' entries in the index")
            found = lookup.locate(list(data))
            assert {m.info.kind for m in found.holders} == {"node"}
            assert sum(bin(int.from_bytes(m.bitmap, "little")).count("1") for m in found.holders) == 8
            assert lookup.stats()["authoritative"]
