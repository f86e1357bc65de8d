"""Reused, page-aligned receive buffers under a byte budget (pinned for the GPU where CUDA is).

Receiving a 32 MiB value into a fresh Python object costs more than the socket: the allocator
maps new pages and the kernel faults every one of them in (ANCHORS.md: 1.1-1.5 GB/s into new
objects, 4.3 GB/s into one reused buffer). So receivers take their buffers from one arena that
is mapped once, faulted in once, registered once (``cudaHostRegister`` so host→device copies
run at pinned speed, later NIXL) and reused for every value. Buffers start on a page boundary,
which is also what O_DIRECT reads and RDMA registrations want.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

from kvpool.cachenode.client.arena import Arena

log = logging.getLogger(__name__)

_default_device: int | None = None  # see set_default_device


def set_default_device(index: int | None) -> None:
    """The CUDA device under whose context pools made without a ``device`` pin their arena. A vLLM
    worker process drives one GPU (its TP rank's); the connector names it when it starts, so that
    buffers made later on any thread (the pool client's receive buffers on its fan-out threads)
    never register under GPU 0, the current device of a thread that selected none."""
    global _default_device
    _default_device = index


class PooledBuffer:
    """A range of the pool; ``view`` is writable until ``release()`` (also on ``with`` exit)."""

    __slots__ = ("_pool", "nbytes", "offset", "view")

    def __init__(self, pool: BufferPool, offset: int, nbytes: int) -> None:
        self._pool = pool
        self.offset = offset
        self.nbytes = nbytes
        self.view: memoryview | None = pool.arena.view(offset, nbytes) if nbytes else memoryview(bytearray())

    def release(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
            if self.nbytes:
                self._pool._release(self.offset)

    def __enter__(self) -> PooledBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class BufferPool:
    """Hands out page-aligned buffers from one arena; waits (bounded) when the budget is spent.

    ``device``: the CUDA device whose context registers (pins) the arena, selected for the call,
    e.g. a vLLM worker's GPU; None takes the process's default (``set_default_device``), else the
    calling thread's current device, which is GPU 0 in a thread that never selected one."""

    def __init__(
        self, budget: int, *, pin: bool | None = None, prefault: bool = True, device: int | None = None
    ) -> None:
        self.arena = Arena(budget)
        self._cond = threading.Condition()
        self.pinned = False
        self.device = device if device is not None else _default_device
        if prefault:  # pay the page faults now, not on the first receive
            view = self.arena.view(0, self.arena.capacity)
            view[::4096] = b"\0" * len(range(0, self.arena.capacity, 4096))
            view.release()
        if pin is not False:
            self.pinned = _pin(
                self.arena.region.address, self.arena.capacity, required=pin is True, device=self.device
            )

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    @property
    def used_bytes(self) -> int:
        return self.arena.used_bytes

    def acquire(self, nbytes: int, timeout: float = 0.0) -> PooledBuffer | None:
        """A buffer of ``nbytes``; None if none frees up within ``timeout`` (the caller then misses
        or falls back). A request larger than the whole pool raises ValueError at once."""
        if nbytes > self.arena.capacity:
            raise ValueError(f"a {nbytes}-byte buffer does not fit a {self.arena.capacity}-byte pool")
        if nbytes == 0:
            return PooledBuffer(self, -1, 0)  # an empty value takes no range
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                offset = self.arena.alloc(nbytes)
                if offset is not None:
                    return PooledBuffer(self, offset, nbytes)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def _release(self, offset: int) -> None:
        with self._cond:
            self.arena.free(offset)
            self._cond.notify_all()

    def close(self) -> None:
        if self.pinned:
            _unpin(self.arena.region.address, self.device)
            self.pinned = False
        self.arena.close()


def _on_device(torch, device: int | None):
    """The CUDA device ``device`` selected for the calls inside (the caller's current one if None)."""
    return torch.cuda.device(device) if device is not None else contextlib.nullcontext()


def _pin(address: int, nbytes: int, *, required: bool, device: int | None = None) -> bool:
    """Page-lock the range for CUDA where the process already uses torch with CUDA, under
    ``device``'s context (see BufferPool).

    Never imports torch itself: a node or a client without torch has nothing to pin for."""
    torch = sys.modules.get("torch")
    try:
        if torch is None:
            raise RuntimeError("torch is not loaded in this process")

        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        with _on_device(torch, device):
            err = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed with error {int(err)}")
        return True
    except Exception as exc:
        if required:
            raise
        log.debug("receive buffers not pinned: %s", exc)
        return False


def _unpin(address: int, device: int | None = None) -> None:
    torch = sys.modules["torch"]
    with _on_device(torch, device):
        torch.cuda.cudart().cudaHostUnregister(address)
