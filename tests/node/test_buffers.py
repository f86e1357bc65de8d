"""Pooled receive buffers: aligned, reused, bounded."""

from __future__ import annotations

import threading

import pytest

from kvpool.cachenode.client.arena import PAGE
from kvpool.cachenode.client.buffers import BufferPool


def test_buffers_are_aligned_reused_and_bounded() -> None:
    pool = BufferPool(4 * PAGE)
    a = pool.acquire(PAGE + 1)
    b = pool.acquire(PAGE)
    assert a.offset % PAGE == 0 and b.offset % PAGE == 0
    assert pool.used_bytes == 3 * PAGE
    a.view[:5] = b"hello"
    assert pool.acquire(2 * PAGE) is None  # budget spent, no wait
    first = a.offset
    a.release()
    a.release()  # twice is harmless
    with pool.acquire(PAGE) as c:
        assert c.offset == first  # the freed range is reused
        assert bytes(c.view[:5]) == b"hello"
    b.release()
    assert pool.used_bytes == 0
    with pytest.raises(ValueError, match="does not fit"):
        pool.acquire(5 * PAGE)
    pool.close()


def test_acquire_waits_for_a_release() -> None:
    pool = BufferPool(2 * PAGE)
    held = pool.acquire(2 * PAGE)
    threading.Timer(0.2, held.release).start()
    got = pool.acquire(PAGE, timeout=10)
    assert got is not None and got.nbytes == PAGE
    got.release()
    pool.close()


def test_pin_required_without_cuda_raises() -> None:
    with pytest.raises(RuntimeError):
        BufferPool(PAGE, pin=True)
