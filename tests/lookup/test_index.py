"""The index's rules: sequence numbers, incarnations, leases, the rebuild window, queries."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from kvpool.cachenode.core.errors import HolderLimit
from kvpool.cachenode.core.fingerprint import fingerprints
from kvpool.cachenode.core.holders import HolderInfo, Status
from kvpool.cachenode.server.lookup.index import LookupIndex, scores

A = HolderInfo("agent-a", "agent", "memory", "grpc://a:7420")
B = HolderInfo("agent-b", "agent", "memory", "grpc://b:7420")
N = HolderInfo("node-0", "node", "disk", "grpc://n:7400")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fp(keys: list[bytes]) -> np.ndarray:
    return fingerprints(b"".join(keys), 32) if keys else np.empty(0, np.uint64)


@pytest.fixture
def keys() -> list[bytes]:
    return [os.urandom(32) for _ in range(8)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def index(clock) -> LookupIndex:
    return LookupIndex(lease_s=10, rebuild_window_s=0, clock=clock)


def held(index: LookupIndex, keys: list[bytes]) -> dict[str, list[int]]:
    located = index.locate(fp(keys))
    return {m.info.holder_id: [j for j in range(located.prefix) if m.bitmap[j // 8] >> (j % 8) & 1]
            for m in located.holders}  # fmt: skip


def test_longest_prefix_runs_and_bitmaps(index, keys):
    index.resync(A, 1, 1, fp(keys[:5]))
    index.resync(B, 1, 1, fp(keys[:2] + keys[3:7]))
    located = index.locate(fp(keys))
    assert located.prefix == 7 and located.authoritative
    runs = {m.info.holder_id: m.run for m in located.holders}
    assert runs == {"agent-a": 5, "agent-b": 2}
    assert held(index, keys) == {"agent-a": [0, 1, 2, 3, 4], "agent-b": [0, 1, 3, 4, 5, 6]}
    ranked = scores(located, 256)
    assert [(s.info.holder_id, s.matched_tokens) for s in ranked] == [("agent-a", 1280), ("agent-b", 512)]
    assert index.locate(fp(keys[7:] + keys)).prefix == 0


def test_batches_apply_in_sequence_and_a_gap_asks_for_a_resync(index, keys):
    index.resync(A, 7, 1, fp(keys[:2]))
    assert index.publish("agent-a", 7, 2, fp(keys[2:3]), fp(keys[:1])).status is Status.OK
    assert held(index, keys[1:]) == {"agent-a": [0, 1]}
    # A retry of an applied batch is acknowledged and not re-applied.
    verdict = index.publish("agent-a", 7, 2, fp(keys[:1]), fp([]))
    assert verdict.status is Status.DUPLICATE
    assert index.locate(fp(keys)).prefix == 0
    # Batch 3 was lost: batch 4 is refused, nothing of it applied.
    verdict = index.publish("agent-a", 7, 4, fp(keys[3:4]), fp([]))
    assert verdict.status is Status.RESYNC and verdict.code == "sequence_gap" and verdict.last_seq == 2
    assert index.locate(fp(keys[3:4])).prefix == 0
    # So is a heartbeat that says the holder got further than what was applied.
    assert index.heartbeat("agent-a", 7, 4).status is Status.RESYNC
    # The snapshot replaces everything: keys it lacks are gone, the rest stays.
    verdict = index.resync(A, 7, 5, fp(keys[2:5]))
    assert verdict.status is Status.OK and verdict.dropped == 1 and verdict.drop_reason == "resync"
    assert held(index, keys[2:]) == {"agent-a": [0, 1, 2]}
    assert index.locate(fp(keys[1:])).prefix == 0
    assert index.publish("agent-a", 7, 6, fp(keys[5:6]), fp([])).status is Status.OK
    assert index.heartbeat("agent-a", 7, 6).status is Status.OK
    assert index.entries == 4


def test_a_new_incarnation_loses_the_old_entries_at_first_contact(index, keys):
    index.resync(A, 1, 1, fp(keys[:4]))
    index.resync(B, 1, 1, fp(keys[:4]))
    verdict = index.heartbeat("agent-a", 2, 0)
    assert verdict.status is Status.RESYNC and verdict.dropped == 4 and verdict.drop_reason == "incarnation"
    assert set(held(index, keys)) == {"agent-b"}
    # Until it sends its snapshot, the new incarnation's batches are refused.
    assert index.publish("agent-a", 2, 1, fp(keys[4:5]), fp([])).status is Status.RESYNC
    index.resync(A, 2, 1, fp(keys[6:]))
    assert held(index, keys[6:]) == {"agent-a": [0, 1]}
    assert held(index, keys[:4]) == {"agent-b": [0, 1, 2, 3]}


def test_unknown_holders_are_asked_to_resync(index):
    verdict = index.publish("agent-x", 1, 2, fp([os.urandom(32)]), fp([]))
    assert verdict.status is Status.RESYNC and verdict.code == "unknown_holder"
    assert index.keys == 0


def test_silent_holders_expire_after_their_lease_only(index, clock, keys):
    index.resync(A, 1, 1, fp(keys[:3]))
    index.resync(B, 1, 1, fp(keys[:3]))
    for _ in range(5):  # B heartbeats every 3 s, A says nothing
        clock.now += 3
        assert index.heartbeat("agent-b", 1, 1).status is Status.OK
        gone = index.expire()
        if clock.now - 1000 > 10:
            break
        assert gone == []
    assert [g.info.holder_id for g in gone] == ["agent-a"] and gone[0].entries == 3
    assert set(held(index, keys)) == {"agent-b"}
    assert [h.info.holder_id for h in index.holders()] == ["agent-b"]
    assert index.heartbeat("agent-a", 1, 1).code == "unknown_holder"


def test_a_stall_of_the_service_itself_expires_nobody(index, clock, keys):
    index.resync(A, 1, 1, fp(keys[:3]))
    clock.now += 60  # nothing ran for a minute: the silence was ours, not the holder's
    assert index.expire() == []
    assert index.locate(fp(keys)).prefix == 3
    expired_after = 0
    while not index.expire():  # regular sweeps again, one a second
        clock.now += 1
        expired_after += 1
    assert 9 <= expired_after <= 11  # the lease was extended by the stall: it runs out 10 s later


def test_not_authoritative_during_the_rebuild_window(clock, keys):
    index = LookupIndex(lease_s=5, rebuild_window_s=5, clock=clock)
    index.resync(A, 1, 1, fp(keys))
    assert index.locate(fp(keys)).authoritative is False
    clock.now += 5
    located = index.locate(fp(keys))
    assert located.authoritative is True and located.prefix == 8


def test_lookups_do_not_wait_for_the_writer_lock(index, keys):
    index.resync(A, 1, 1, fp(keys))
    result = {}
    with index._lock:  # a writer in the middle of a long resync
        reader = threading.Thread(target=lambda: result.setdefault("prefix", index.locate(fp(keys)).prefix))
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive(), "a lookup waited for the writers' lock"
    assert result["prefix"] == 8


def test_writers_work_in_slices_that_readers_can_run_between(index, monkeypatch):
    """numpy holds the GIL through one gather or sort: a snapshot, a growth, an eviction batch and
    a holder's removal must each be cut into calls of at most SLICE keys."""
    from kvpool.cachenode.server.lookup import table as table_module

    largest = {"n": 0}
    for name in ("_find", "_place"):
        real = getattr(table_module, name)

        def spy(a, fps, *args, _real=real, **kwargs):
            largest["n"] = max(largest["n"], len(fps))
            return _real(a, fps, *args, **kwargs)

        monkeypatch.setattr(table_module, name, spy)
    n = 3 * table_module.SLICE + 5
    many = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1 << 63)
    index.resync(A, 1, 1, many)  # grows the table from its minimum several times on the way
    index.resync(B, 1, 1, many[: n // 2])
    assert index.keys == n and {h.info.holder_id: h.entries for h in index.holders()} == {
        "agent-a": n, "agent-b": n // 2}  # fmt: skip
    assert (
        index.publish("agent-a", 1, 2, np.empty(0, np.uint64), many[: 2 * table_module.SLICE + 1]).status
        is Status.OK
    )
    index.resync(B, 1, 3, many[-10:])  # drops most of what B held
    assert index.keys == n - 2 * table_module.SLICE - 1  # B's last 10 are among A's
    located = index.locate(many[-10:])
    assert located.prefix == 10 and {m.info.holder_id for m in located.holders} == {"agent-a", "agent-b"}
    assert 0 < largest["n"] <= table_module.SLICE


def test_a_reader_gets_answers_while_a_large_snapshot_is_applied(index, keys):
    """Lookups take no lock and the writer works in slices: a reader thread keeps answering,
    correctly, all the way through a snapshot of half a million keys (growths included)."""
    mine = fp([os.urandom(32) for _ in range(128)])
    index.resync(A, 1, 1, mine)
    snapshot = fp([os.urandom(32) for _ in range(1 << 19)])
    done, answered = threading.Event(), []

    def write() -> None:
        index.resync(B, 1, 1, snapshot)
        done.set()

    writer = threading.Thread(target=write)
    started = time.monotonic()
    writer.start()
    while not done.is_set():
        located = index.locate(mine)
        assert located.prefix == 128 and [m.info.holder_id for m in located.holders] == ["agent-a"]
        answered.append(time.monotonic())
    ended = time.monotonic()
    writer.join()
    assert index.keys == 128 + (1 << 19)
    assert len(answered) >= 20, f"{len(answered)} answers during a {ended - started:.2f} s snapshot"
    gaps = np.diff([started, *answered, ended])
    assert gaps.max() < (ended - started) / 4, (
        f"the reader waited {gaps.max():.3f} s of {ended - started:.2f} s"
    )


def test_more_than_64_holders(index, keys):
    infos = [HolderInfo(f"agent-{i}", "agent", "memory", "") for i in range(130)]
    for i, info in enumerate(infos):
        index.resync(info, 1, 1, fp(keys[: 1 + i % 8]))
    located = index.locate(fp(keys))
    assert located.prefix == 8 and len(located.holders) == 130
    runs = {m.info.holder_id: m.run for m in located.holders}
    assert all(runs[f"agent-{i}"] == 1 + i % 8 for i in range(130))


def test_holders_beyond_the_limit_are_refused(clock, keys):
    index = LookupIndex(lease_s=10, rebuild_window_s=0, clock=clock, max_holders=2)
    index.resync(A, 1, 1, fp(keys[:1]))
    index.resync(B, 1, 1, fp(keys[:1]))
    with pytest.raises(HolderLimit):
        index.resync(N, 1, 1, fp(keys))
    assert {m.info.holder_id for m in index.locate(fp(keys)).holders} == {"agent-a", "agent-b"}
    assert index.resync(A, 2, 1, fp(keys[:2])).status is Status.OK  # a known holder may always resync
