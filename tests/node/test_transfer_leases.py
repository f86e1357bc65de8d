"""Leases on L1 ranges for one-sided transfers (no NIXL needed): pins, tokens, TTL, the put
quarantine and checksum-verified commits, against a real store with a controllable clock."""

from __future__ import annotations

import gc
import os

import pytest

from kvpool.cachenode.core.errors import CorruptData, InvalidRequest, LeaseGone, NoRoom
from kvpool.cachenode.core.leases import LeaseTable
from kvpool.cachenode.core.record import checksum
from kvpool.cachenode.server.nixl_leases import TransferLeases
from kvpool.cachenode.server.tiers.store import TieredStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    clock = Clock()
    store = TieredStore(1 << 20, high_watermark=1.0, low_watermark=1.0)
    store.leases = LeaseTable(clock)  # the store's pins follow the same clock
    store.memory._pinned = store.leases.is_pinned
    with store:
        yield store, TransferLeases(store, ttl_s=10, clock=clock), clock
    assert store.stats()["pinned_bytes"] == 0


def test_get_lease_pins_until_released(setup) -> None:
    store, leases, _ = setup
    store.put(b"a", b"A" * 5000)
    lease = leases.open_get([b"a", b"missing"])
    assert [None if b is None else bytes(b) for b in lease.buffers] == [b"A" * 5000, None]
    assert store.stats()["pinned_bytes"] == 5000 and store.leases.is_pinned(b"a")
    assert not leases.release(lease.lease_id, lease.token + 1)  # a wrong token ends nothing
    assert store.stats()["pinned_bytes"] == 5000
    assert leases.release(lease.lease_id, lease.token)
    assert not leases.release(lease.lease_id, lease.token)  # twice: already gone
    assert store.stats()["pinned_bytes"] == 0 and len(leases) == 0


def test_nothing_found_means_no_lease(setup) -> None:
    _, leases, _ = setup
    lease = leases.open_get([b"nope"])
    assert lease.lease_id == 0 and len(leases) == 0


def test_a_leased_value_survives_delete_and_churn(setup) -> None:
    store, leases, _ = setup
    value = os.urandom(200_000)
    store.put(b"hot", value)
    lease = leases.open_get([b"hot"])
    store.delete([b"hot"])
    for i in range(20):  # fill L1 several times over
        store.put(b"churn%d" % i, os.urandom(200_000))
    assert bytes(lease.buffers[0]) == value  # what a peer reads by address is untouched
    leases.release(lease.lease_id, lease.token)


def test_expired_get_lease_is_reclaimed(setup) -> None:
    store, leases, clock = setup
    store.put(b"a", b"x" * 4096)
    lease = leases.open_get([b"a"])
    store.delete([b"a"])
    used = store.memory.arena_used
    clock.now += 11
    assert leases.sweep() == 1
    del lease
    gc.collect()
    assert store.memory.arena_used == used - 4096 and store.stats()["pinned_bytes"] == 0


def test_put_commit_with_matching_checksums_stores_in_place(setup) -> None:
    store, leases, _ = setup
    values = {b"p1": os.urandom(7000), b"p2": os.urandom(1)}
    lease = leases.open_put([(k, len(v)) for k, v in values.items()])
    assert store.get(b"p1") is None  # reserved is not visible
    addresses = []
    for buf, value in zip(lease.buffers, values.values(), strict=True):
        buf[:] = memoryview(value)  # what the peer's WRITE does
        addresses.append(store.memory.address_of(buf))
    assert leases.commit(lease.lease_id, lease.token, [checksum(k, v) for k, v in values.items()]) == 2
    for (key, value), address in zip(values.items(), addresses, strict=True):
        assert bytes(store.get(key)) == value
        assert store.memory.address_of(store.memory.peek(key)) == address  # no copy


def test_put_commit_with_a_bad_checksum_stores_nothing(setup) -> None:
    store, leases, _ = setup
    store.put(b"p1", b"old")
    lease = leases.open_put([(b"p1", 10), (b"p2", 10)])
    for buf in lease.buffers:
        buf[:] = 1
    sums = [checksum(b"p1", b"\x01" * 10), checksum(b"p2", b"\x02" * 10)]  # p2's bytes differ
    with pytest.raises(CorruptData):
        leases.commit(lease.lease_id, lease.token, sums)
    assert bytes(store.get(b"p1")) == b"old" and store.get(b"p2") is None
    with pytest.raises(LeaseGone):  # the failed commit ended the lease
        leases.commit(lease.lease_id, lease.token, sums)


def test_expired_put_lease_waits_out_its_quarantine(setup) -> None:
    store, leases, clock = setup
    base = store.memory.arena_used
    lease = leases.open_put([(b"slow", 8192)])
    lease_id, token = lease.lease_id, lease.token
    del lease
    clock.now += 10.5
    with pytest.raises(LeaseGone, match="expired"):
        leases.commit(lease_id, token, [0])
    leases.sweep()
    gc.collect()
    assert store.memory.arena_used == base + 8192  # a late WRITE could still land: not reused yet
    assert store.stats()["pinned_bytes"] == 0
    clock.now += 10
    leases.sweep()
    gc.collect()
    assert store.memory.arena_used == base


@pytest.mark.parametrize(
    "entries, error",
    [
        ([(b"k", 0)], "positive size"),
        ([(b"k", 10), (b"k", 10)], "same key twice"),
        ([(b"", 10)], "key must be"),
    ],
)
def test_bad_reservations_are_refused(setup, entries, error) -> None:
    store, leases, _ = setup
    with pytest.raises(InvalidRequest, match=error):
        leases.open_put(entries)
    assert store.memory.arena_used == 0


def test_reservation_larger_than_l1_is_no_room(setup) -> None:
    store, leases, _ = setup
    with pytest.raises(NoRoom):
        leases.open_put([(b"a", 600_000), (b"b", 600_000)])
    gc.collect()
    assert store.memory.arena_used == 0 and len(leases) == 0
