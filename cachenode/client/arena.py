"""A fixed region of memory with an allocator, so a stored value has a stable address.

Python objects move nothing, but nothing outside the process can reach them either: NIXL must
register memory once and read it by address, and a connector in another process of the same pod
can only read a value that lives in memory both map. So the zero-copy tiers keep values in one
large page-aligned region (anonymous, or a file under /dev/shm that other processes map) and
hand out (offset, size) ranges of it.

``Extents`` is the allocator alone (pure, no memory): first fit over a free list kept sorted by
offset, neighbours coalesced on free, every range a multiple of the alignment. Values are
chunks of megabytes, so the lists stay short and a bisect is all the indexing they need.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import mmap
import os
import threading

PAGE = mmap.PAGESIZE


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


class Extents:
    """First-fit allocation of aligned ranges in ``[0, capacity)``; not thread-safe."""

    def __init__(self, capacity: int, alignment: int = PAGE) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        if capacity < 0:
            raise ValueError(f"capacity must not be negative, got {capacity}")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self._free_offsets: list[int] = [0] if self.capacity else []
        self._free_sizes: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self._used: dict[int, int] = {}  # offset -> size of live allocations
        self.used_bytes = 0

    def alloc(self, size: int) -> int | None:
        """Offset of a new range of at least ``size`` bytes, or None when no free range fits."""
        if size <= 0:
            raise ValueError(f"allocation size must be positive, got {size}")
        need = align_up(size, self.alignment)
        for i, offset in enumerate(self._free_offsets):
            have = self._free_sizes[offset]
            if have < need:
                continue
            del self._free_sizes[offset]
            if have == need:
                del self._free_offsets[i]
            else:
                rest = offset + need
                self._free_offsets[i] = rest
                self._free_sizes[rest] = have - need
            self._used[offset] = need
            self.used_bytes += need
            return offset
        return None

    def free(self, offset: int) -> int:
        """Release the range at ``offset``; returns its size. Freeing twice is an error."""
        size = self._used.pop(offset, None)
        if size is None:
            raise KeyError(f"no allocation at offset {offset}")
        self.used_bytes -= size
        start, span = offset, size
        i = bisect.bisect_left(self._free_offsets, offset)
        if i < len(self._free_offsets) and self._free_offsets[i] == offset + size:  # merge the next
            nxt = self._free_offsets.pop(i)
            span += self._free_sizes.pop(nxt)
        if i > 0:  # merge into the previous one
            prev = self._free_offsets[i - 1]
            if prev + self._free_sizes[prev] == offset:
                self._free_sizes[prev] += span
                return size
        self._free_offsets.insert(i, start)
        self._free_sizes[start] = span
        return size

    def size_of(self, offset: int) -> int:
        return self._used[offset]

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    @property
    def largest_free(self) -> int:
        return max(self._free_sizes.values(), default=0)

    @property
    def allocations(self) -> int:
        return len(self._used)

    def check(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (tests call this)."""
        spans = sorted(
            [(o, s, "used") for o, s in self._used.items()]
            + [(o, s, "free") for o, s in self._free_sizes.items()]
        )
        pos = 0
        prev_kind = None
        for offset, size, kind in spans:
            assert offset == pos, f"gap or overlap at {pos} (next span at {offset})"
            assert size > 0 and size % self.alignment == 0, f"bad span size {size}"
            assert not (kind == prev_kind == "free"), f"adjacent free spans not merged at {offset}"
            pos += size
            prev_kind = kind
        assert pos == self.capacity, f"spans cover {pos} of {self.capacity}"
        assert self._free_offsets == sorted(self._free_sizes), "free list out of order"
        assert self.used_bytes == sum(self._used.values())


class Region:
    """Page-aligned memory: anonymous, or a file (under /dev/shm) that other processes map too."""

    def __init__(self, capacity: int, path: str | None = None, *, create: bool = True) -> None:
        self.path = path
        self._owner = create
        if path is None:
            if capacity <= 0:
                raise ValueError("an anonymous region needs a positive capacity")
            self._mm = mmap.mmap(-1, capacity)
        else:
            flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
            fd = os.open(path, flags, 0o600)
            try:
                if create:
                    os.ftruncate(fd, capacity)
                else:
                    capacity = os.fstat(fd).st_size
                self._mm = mmap.mmap(fd, capacity, flags=mmap.MAP_SHARED)
            except BaseException:
                os.close(fd)
                if create:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                raise
            os.close(fd)  # the mapping keeps the memory
        self.capacity = capacity
        self.view = memoryview(self._mm)
        anchor = ctypes.c_char.from_buffer(self._mm)
        self.address = ctypes.addressof(anchor)  # stable until close(); what NIXL registers
        del anchor

    def slice(self, offset: int, size: int) -> memoryview:
        if offset < 0 or size < 0 or offset + size > self.capacity:
            raise ValueError(f"range [{offset}, {offset + size}) is outside the {self.capacity}-byte region")
        return self.view[offset : offset + size]

    def close(self, unlink: bool | None = None) -> None:
        """Unmap; the creator of a file-backed region also removes the file unless told not to."""
        self.view.release()
        with contextlib.suppress(BufferError):  # a slice still exported: the OS reclaims at exit
            self._mm.close()
        if self.path is not None and (self._owner if unlink is None else unlink):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class Arena:
    """A region plus its allocator, thread-safe: ``alloc`` → (offset, writable view) → ``free``."""

    def __init__(self, capacity: int, path: str | None = None, alignment: int = PAGE) -> None:
        self.region = Region(align_up(capacity, alignment), path)
        self.extents = Extents(self.region.capacity, alignment)
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.extents.capacity

    @property
    def used_bytes(self) -> int:
        return self.extents.used_bytes

    def alloc(self, size: int) -> int | None:
        with self._lock:
            return self.extents.alloc(size)

    def free(self, offset: int) -> int:
        with self._lock:
            return self.extents.free(offset)

    def view(self, offset: int, size: int) -> memoryview:
        return self.region.slice(offset, size)

    def close(self) -> None:
        self.region.close()
