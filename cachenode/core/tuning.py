"""Process-level tuning for moving large buffers.

glibc serves allocations above its mmap threshold (≤ 32 MiB, adaptive) with fresh mmap'd pages
and unmaps them on free, so every received 32 MiB value pays ~8k page faults plus the kernel's
zeroing: measured here, receiving 32 MiB values into new bytes objects ran at 1.4 GB/s against
4.6-5.9 GB/s once large blocks are served from the heap and freed memory is kept for reuse
(docs/benchmarks.md). The price: up to `trim_threshold` of freed memory stays mapped.

Only the process owner should call this (`kvpool node`/`up`, benchmarks): it changes malloc
for the whole process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
GiB = 1024**3
MiB = 1024**2


def tune_malloc_for_large_buffers(
    mmap_threshold: int = GiB, trim_threshold: int = 128 * MiB, top_pad: int = 64 * MiB
) -> bool:
    """Keep large blocks in the heap and reuse them; False where glibc's mallopt is missing."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, mmap_threshold),
            (M_TRIM_THRESHOLD, trim_threshold),
            (M_TOP_PAD, top_pad),
        )
    )
    if not ok:
        log.debug("mallopt refused a setting; large buffers keep glibc's defaults")
    return ok
