"""The arena allocator against a model of what it should hold, and the shared-memory region."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from kvpool.cachenode.client.arena import PAGE, Arena, Extents


def test_alloc_is_aligned_and_first_fit() -> None:
    ext = Extents(10 * PAGE)
    a = ext.alloc(1)
    b = ext.alloc(PAGE + 1)
    c = ext.alloc(PAGE)
    assert (a, b, c) == (0, PAGE, 3 * PAGE)
    assert ext.used_bytes == 4 * PAGE
    ext.free(b)
    assert ext.alloc(PAGE) == PAGE  # first fit reuses the hole
    ext.check()


def test_full_arena_refuses_and_free_coalesces() -> None:
    ext = Extents(4 * PAGE)
    offs = [ext.alloc(PAGE) for _ in range(4)]
    assert ext.alloc(1) is None
    for o in (offs[1], offs[3], offs[2]):  # free out of order: the three must merge into one span
        ext.free(o)
        ext.check()
    assert ext.largest_free == 3 * PAGE
    assert ext.alloc(3 * PAGE) == PAGE


def test_bad_calls_raise() -> None:
    ext = Extents(2 * PAGE)
    with pytest.raises(ValueError):
        ext.alloc(0)
    with pytest.raises(KeyError):
        ext.free(PAGE)
    off = ext.alloc(10)
    ext.free(off)
    with pytest.raises(KeyError):
        ext.free(off)  # double free
    with pytest.raises(ValueError):
        Extents(PAGE, alignment=3000)


def test_random_workload_matches_model() -> None:
    rnd = random.Random(7)
    ext = Extents(512 * PAGE)
    live: dict[int, int] = {}
    for _ in range(5000):
        if live and rnd.random() < 0.45:
            off = rnd.choice(list(live))
            assert ext.free(off) == live.pop(off)
        else:
            size = rnd.choice([1, PAGE, 3 * PAGE + 5, 16 * PAGE, rnd.randrange(1, 40 * PAGE)])
            off = ext.alloc(size)
            if off is None:
                assert ext.largest_free < size
                continue
            assert off % PAGE == 0
            for o, s in live.items():  # no overlap with any live range
                assert off + size <= o or o + s <= off
            live[off] = ext.size_of(off)
        if _ % 250 == 0:
            ext.check()
    ext.check()
    assert ext.used_bytes == sum(live.values())


CHILD = (
    "import sys; from kvpool.cachenode.client.arena import Region; "
    "r = Region(0, sys.argv[1], create=False); "
    "sys.stdout.buffer.write(bytes(r.slice(int(sys.argv[2]), int(sys.argv[3])))); r.close()"
)


def test_file_backed_region_is_shared_between_processes(tmp_path) -> None:
    path = str(tmp_path / "arena")
    arena = Arena(8 * PAGE, path)
    off = arena.alloc(3 * PAGE)
    payload = bytes(random.Random(1).randbytes(3 * PAGE))
    arena.view(off, len(payload))[:] = payload
    assert arena.region.address % PAGE == 0
    child = subprocess.run(
        [sys.executable, "-P", "-c", CHILD, path, str(off), str(len(payload))],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert child.stdout == payload
    with pytest.raises(ValueError):
        arena.view(7 * PAGE, 2 * PAGE)
    arena.close()
    assert not (tmp_path / "arena").exists()
