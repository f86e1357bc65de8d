"""The fingerprint table against a plain dict-of-sets model, and its lock-free reads."""

from __future__ import annotations

import os
import random

import numpy as np

from kvpool.cachenode.core.fingerprint import LIVE_BIT, fingerprints
from kvpool.cachenode.server.lookup import table as table_module
from kvpool.cachenode.server.lookup.table import FingerprintTable


def _fp(keys: list[bytes]) -> np.ndarray:
    return np.concatenate([fingerprints(k, len(k)) for k in keys]) if keys else np.empty(0, np.uint64)


def _holders(mask_row: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.unpackbits(mask_row.view(np.uint8), bitorder="little")).tolist())


def test_random_admits_and_evicts_match_a_dict_model():
    rng = random.Random(7)
    keys = [os.urandom(32) for _ in range(6000)]
    table = FingerprintTable()
    model: dict[bytes, set[int]] = {}
    for step in range(400):
        bit = rng.randrange(150)  # beyond 64 and 128: the masks grow to three words
        batch = rng.sample(keys, rng.randrange(1, 200))
        batch += batch[: rng.randrange(3)]  # duplicates inside one batch
        if rng.random() < 0.6:
            gained, _ = table.add(_fp(batch), bit)
            expected = {k for k in batch if bit not in model.get(k, set())}
            for k in batch:
                model.setdefault(k, set()).add(bit)
            assert gained == len(expected)
        else:
            removed = table.remove(_fp(batch), bit)
            expected = {k for k in batch if bit in model.get(k, set())}
            for k in batch:
                model.get(k, set()).discard(bit)
            assert removed == len(expected)
        if step % 60 == 0:
            gone = rng.randrange(150)
            lost = table.remove_holder(gone)
            assert lost == sum(1 for s in model.values() if gone in s)
            for s in model.values():
                s.discard(gone)
    masks = table.masks(_fp(keys))
    for i, key in enumerate(keys):
        assert _holders(masks[i]) == model.get(key, set())
    assert table.live == sum(1 for s in model.values() if s)
    assert table.words == 3


def test_growth_keeps_every_key_and_stays_compact():
    table = FingerprintTable()
    fps = fingerprints(os.urandom(32 * 200_000), 32)
    for start in range(0, len(fps), 50_000):
        table.add(fps[start : start + 50_000], start // 50_000)
    masks = table.masks(fps)
    assert (masks[:, 0] != 0).all()
    assert table.live == 200_000
    # (1 + 1 words) * 8 bytes per slot at a load factor of at least 0.45
    assert table.nbytes / table.live <= 16 / 0.45 + 1
    absent = fingerprints(os.urandom(32 * 1000), 32)
    assert not table.masks(absent).any()


def test_keys_of_different_lengths_do_not_collide():
    keys = [b"a", b"a\x00", b"\x00a", b"a" * 8, b"a" * 9, b"b" * 16, b"b" * 17, b"c" * 64]
    fps = _fp(keys)
    assert len(set(fps.tolist())) == len(keys)
    assert (fps & LIVE_BIT == LIVE_BIT).all()  # 0 and 1 stay free for empty / tombstone
    many = fingerprints(os.urandom(32 * 100_000), 32)
    assert len(np.unique(many)) == 100_000


def test_evicted_keys_leave_tombstones_that_a_rebuild_drops():
    table = FingerprintTable()
    keys = [os.urandom(32) for _ in range(3000)]
    table.add(_fp(keys), 0)
    table.remove(_fp(keys[:2000]), 0)
    assert table.live == 1000 and table.tombstones == 2000
    # Churn until a rebuild compacts the tombstones away; every remaining key stays findable.
    more = [os.urandom(32) for _ in range(20_000)]
    table.add(_fp(more), 1)
    assert table.tombstones < 2000
    assert (table.masks(_fp(keys[2000:] + more))[:, 0] != 0).all()
    assert not table.masks(_fp(keys[:2000])).any()


def test_a_reader_keeps_its_arrays_while_a_writer_swaps_them():
    """A rebuild builds new arrays and swaps one reference; a reader's arrays stay intact."""
    table = FingerprintTable()
    keys = [os.urandom(32) for _ in range(1000)]
    table.add(_fp(keys), 0)
    before = table._a
    table.add(fingerprints(os.urandom(32 * 100_000), 32), 1)  # grows: new arrays
    assert table._a is not before
    slots, masks = table_module._find(before, _fp(keys))
    assert (slots >= 0).all() and (masks[:, 0] == 1).all()
