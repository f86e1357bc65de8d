"""One of three peered `kvpool node` processes SIGKILLed while a batch put or a batch get that
spans every node is on the wire (issue 22, item 5; the one-node case is
test_node_killed_mid_transfer.py).

A thread makes calls back to back (a get of the same keys, or a put of a fresh batch); the test
kills a node half a call into one of them. What must hold: every call ends within the client's
timeout (plus a margin), and none fails, since two nodes are left (a kvpool error would be the
only failure allowed at all); no value read is ever other bytes than its own; keys owned by the
nodes left standing hit in every get, the victim's are misses (R = 1) or replica hits (R = 2);
with R = 2 every acknowledged value still reads back exactly; puts after the kill land on the
next owner in rendezvous order and read back; on the nodes left standing nothing stays pinned
(no lease ended by expiry) and memory stays within its budget; and the client's pooled receive
buffers all come back. The last test aims the kill exactly between a NIXL lease and its
transfer."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.core.errors import KVPoolError
from kvpool.cachenode.core.placement import Placement

from ..nixl.conftest import nixl_or_skip
from .budget import assert_unpinned_and_within_budget
from .test_pool_processes import holders

MiB = 1 << 20
TIMEOUT_S = 3.0
MARGIN_S = 4.0  # a call that started just before the kill, on a loaded 2-core machine
PER_NODE = 4  # keys each node owns first in every batch: each call spans the whole pool
VALUE = 2 * MiB
PUT_VALUE = MiB // 2  # a fresh batch each call: 6 MiB, kept whole within 256 MiB

TRANSPORTS = pytest.mark.parametrize("transport", ["grpc", "nixl"], ids=["data-channel", "nixl"])
REPLICAS = pytest.mark.parametrize("replicas", [1, 2], ids=["r1", "r2"])


@dataclass
class Call:
    started: float
    ended: float
    outcome: object = None
    error: BaseException | None = None


@dataclass
class Loop:
    """Runs `call` back to back in a thread until stopped, recording each call."""

    call: Callable[[], object]
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                outcome, error = self.call(), None
            except BaseException as exc:  # recorded: the test says which kinds are allowed
                outcome, error = None, exc
            with self.changed:
                self.calls.append(Call(started, time.monotonic(), outcome, error))
                self.changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Until `predicate` holds, checked at each call's end (no polling interval)."""
        with self.changed:
            if not self.changed.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}: {self.calls}")

    def ok_after(self, moment: float) -> int:
        return sum(1 for c in self.calls if c.started > moment and c.error is None)

    def finish(self) -> list[Call]:
        self.stop.set()
        self.thread.join(TIMEOUT_S + MARGIN_S)
        assert not self.thread.is_alive(), "a call outlived its timeout"
        return list(self.calls)


def spanning(nodes, prefix: str, replicas: int, size: int) -> dict[bytes, bytes]:
    """PER_NODE keys whose first owner is each node, with random values."""
    placement = Placement(n.node_id for n in nodes)
    picked: dict[str, list[bytes]] = {n.node_id: [] for n in nodes}
    for i in itertools.count():
        key = f"{prefix}-{i}".encode().ljust(32, b".")
        first = placement.owners(key, replicas)[0]
        if len(picked[first]) < PER_NODE:
            picked[first].append(key)
        if all(len(keys) == PER_NODE for keys in picked.values()):
            break
    return {k: os.urandom(size + j) for j, k in enumerate(sorted(itertools.chain(*picked.values())))}


def kill_during(pool, victim, loop: Loop) -> tuple[float, float]:
    """Kill `victim` half a call into the call after the loop's third good one (so that bytes
    are on the wire, not a request about to start); wait for the call on the wire to end and for
    2 good calls started after the kill. Returns when the kill began and ended."""
    loop.wait(lambda: loop.ok_after(0) >= 3, 20, "calls before the kill")
    time.sleep(min(c.ended - c.started for c in loop.calls[:3]) / 2)  # aims the kill; proves nothing
    killed_at = time.monotonic()
    pool.kill(victim)
    dead_at = time.monotonic()
    loop.wait(
        lambda: any(c.ended > dead_at for c in loop.calls), TIMEOUT_S + MARGIN_S, "the call on the wire"
    )
    loop.wait(lambda: loop.ok_after(dead_at) >= 2, 20, "good calls after the kill")
    return killed_at, dead_at


def check_calls(calls: list[Call], killed_at: float, dead_at: float) -> None:
    """Every call ended in time, and none failed: two nodes were left to answer (a put's values
    go to the next owner, a get's keys there are misses or replica hits)."""
    slowest = max(c.ended - c.started for c in calls)
    assert slowest < TIMEOUT_S + MARGIN_S, f"a call took {slowest:.1f} s"
    assert any(c.started < dead_at and c.ended > killed_at for c in calls), "the kill fell between calls"
    errors = [c.error for c in calls if c.error is not None]
    assert all(isinstance(e, KVPoolError) for e in errors), errors  # anything else is a crash
    assert errors == [], f"a call failed although two nodes were up: {errors}"


@TRANSPORTS
@REPLICAS
def test_a_node_killed_during_batch_puts(pool, replicas, transport):
    """Each call puts a fresh batch, so what a call acknowledged is never written again: with
    R = 2 every value of every call (the one on the wire included) must read back; with R = 1
    only values whose one copy was on the victim may be misses."""
    if transport == "nixl":
        nixl_or_skip()
    pool.extra = ("--replication-factor", str(replicas), "--memory", "256MiB")  # no eviction
    nodes = pool.start_all(3)
    victim, survivors = nodes[1], [nodes[0], nodes[2]]
    before, after = Placement(n.node_id for n in nodes), Placement(n.node_id for n in survivors)
    stored = spanning(nodes, "acked", replicas, 256 * 1024)  # acknowledged before the loop starts
    victims = {k for k in stored if before.owners(k, 1) == [victim.node_id]}
    numbers = itertools.count()

    def put_fresh() -> dict[bytes, bytes]:
        batch = spanning(nodes, f"wire-{next(numbers)}", replicas, PUT_VALUE)
        client.put_many(batch)
        return batch

    with Client(pool.urls(), timeout=TIMEOUT_S, refresh_interval=0.5, transport=transport) as client:
        client.put_many(stored)
        assert client.get_many(list(stored)) == stored
        loop = Loop(put_fresh)
        killed_at, dead_at = kill_during(pool, victim, loop)
        calls = loop.finish()
        check_calls(calls, killed_at, dead_at)
        stats = assert_unpinned_and_within_budget(survivors)
        assert all(s["tiers"]["memory"]["evictions"] == 0 for s in stats.values())  # misses: the kill
        acked = {k: v for c in calls for k, v in c.outcome.items()}
        everything = {**stored, **acked}
        got = client.get_many(list(everything))
        assert all(got[k] == everything[k] for k in got), "a value came back with other bytes"
        missing = set(everything) - set(got)
        if replicas == 2:
            assert missing == set(), f"{len(missing)} acknowledged values lost with R = 2"
        else:  # its one copy was on the victim, acknowledged before the kill had ended
            assert victims <= missing  # (the kill did take those)
            maybe_lost = {k for c in calls if c.started < dead_at for k in c.outcome}
            assert all(before.owners(k, 1) == [victim.node_id] for k in missing), missing
            assert missing <= victims | maybe_lost, missing
        # the puts after the kill landed on the next owners and read back
        later = {k: v for c in calls if c.started > dead_at for k, v in c.outcome.items()}
        held = holders(survivors, list(later))
        assert all(set(after.owners(k, replicas)) <= held[k] for k in later), held
        assert client.get_many(list(later)) == later
        assert client.buffers.used_bytes == 0
    with Client(survivors[0].url, timeout=TIMEOUT_S) as fresh:
        assert fresh.get_many(list(later)) == later
    assert_unpinned_and_within_budget(survivors)


@TRANSPORTS
@REPLICAS
def test_a_node_killed_during_batch_gets(pool, replicas, transport):
    """`get_many_into` of keys on every node, back to back: every answer is exact, the live
    owners' keys are in each, the victim's turn into misses (R = 1) or replica hits (R = 2)."""
    if transport == "nixl":
        nixl_or_skip()
    pool.extra = ("--replication-factor", str(replicas))
    nodes = pool.start_all(3)
    victim, survivors = nodes[1], [nodes[0], nodes[2]]
    values = spanning(nodes, "read", replicas, VALUE)
    keys = list(values)
    first_owner = Placement(n.node_id for n in nodes)
    theirs = {k for k in keys if first_owner.owners(k, 1) == [victim.node_id]}
    kept = set(keys) if replicas == 2 else set(keys) - theirs  # what must hit after the kill
    with Client(pool.urls(), timeout=TIMEOUT_S, refresh_interval=0.5, transport=transport) as client:
        client.put_many(values)

        def get_all() -> tuple[frozenset, int]:
            got = client.get_many_into(keys)
            wrong = 0
            for key, buf in got.items():
                wrong += bytes(buf.view) != values[key]
                buf.release()
            return frozenset(got), wrong

        loop = Loop(get_all)
        killed_at, dead_at = kill_during(pool, victim, loop)
        calls = loop.finish()
        check_calls(calls, killed_at, dead_at)
        answered = [c for c in calls if c.error is None]
        assert sum(c.outcome[1] for c in answered) == 0, "a value came back with other bytes"
        assert all(c.outcome[0] >= kept for c in answered), "a key of a live owner missed"
        assert all(c.outcome[0] == set(keys) for c in answered if c.ended < killed_at)
        assert all(c.outcome[0] == kept for c in answered if c.started > dead_at)
        assert client.buffers.used_bytes == 0  # every receive buffer came back, failed calls' too
        # puts after the kill go to the next owner and read back
        client.put_many({k: values[k] for k in theirs})
        after = Placement(n.node_id for n in survivors)
        held = holders(survivors, sorted(theirs))
        assert all(set(after.owners(k, replicas)) <= held[k] for k in theirs), held
        assert client.get_many(keys) == values
    assert_unpinned_and_within_budget(survivors)


@pytest.mark.parametrize("op", ["get", "put"])
def test_a_node_killed_between_granting_a_nixl_lease_and_the_transfer(pool, op):
    """The NIXL cases above, with the kill aimed: the victim is SIGKILLed as the client starts
    the one-sided READ (get) or WRITE (put) after the node granted its lease or reservation, so
    the transfer itself fails against a dead node. The call routes around the node (R = 2: a
    replica, or the next owner for a put) instead of failing with NixlRequired."""
    nixl_or_skip()
    pool.extra = ("--replication-factor", "2")
    nodes = pool.start_all(3)
    victim, survivors = nodes[1], [nodes[0], nodes[2]]
    values = spanning(nodes, f"aimed-{op}", 2, VALUE)
    keys = list(values)
    with Client(pool.urls(), timeout=TIMEOUT_S, transport="nixl") as client:
        if op == "get":
            client.put_many(values)
        link = client._ensure_members()[victim.node_id].conn._nixl.link  # the test looks inside
        real, kills = link._transfer, []

        def kill_then_transfer(*args, **kwargs):
            if not kills:
                kills.append(time.monotonic())
                pool.kill(victim)
            return real(*args, **kwargs)

        link._transfer = kill_then_transfer
        if op == "get":
            got = client.get_many_into(keys)
            assert kills, "the READ from the victim was never started"
            try:
                assert {k: bytes(b.view) for k, b in got.items()} == values
            finally:
                for buf in got.values():
                    buf.release()
        else:
            client.put_many(values)
            assert kills, "the WRITE to the victim was never started"
            assert client.get_many(keys) == values
            after = Placement(n.node_id for n in survivors)
            held = holders(survivors, keys)
            assert all(set(after.owners(k, 2)) <= held[k] for k in keys), held
        assert client.buffers.used_bytes == 0
    assert_unpinned_and_within_budget(survivors)
