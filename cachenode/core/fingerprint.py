"""64-bit fingerprints of chunk keys, computed for a whole batch at once (pure numpy, no I/O).

The index stores a fingerprint per key instead of the key (8 bytes instead of up to 64), which is
what keeps a (key, holder) entry small. Keys of one batch share one length; each key is read as
little-endian 64-bit words (zero-padded), combined with odd multipliers, offset by the length,
and finished with murmur3's fmix64 so that every input bit reaches every output bit. The top bit
is forced (0 and 1 mark empty and removed slots), leaving 63 bits: kvpool's chunk keys are blake3
digests, so a lookup meets a stranger's fingerprint with probability about 16 / 2^63 (the slots it
compares). If it ever did, the index would name a holder for a chunk it lacks, and that holder
answers a miss: it looks chunks up by their full key and verifies them.
"""

from __future__ import annotations

import numpy as np

from kvpool.cachenode.core.record import MAX_KEY_SIZE

LIVE_BIT = np.uint64(1 << 63)

_MULTIPLIERS = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0xD6E8FEB86659FD93,
        0x27D4EB2F165667C5,
        0xA0761D6478BD642F,
        0xE7037ED1A0B428DB,
        0x8EBC6AF09C88C6E3,
        0x589965CC75374CC3,
    ],
    dtype=np.uint64,
)
_LENGTH_SEEDS = [np.uint64((0x2545F4914F6CDD1D * size) % (1 << 64)) for size in range(MAX_KEY_SIZE + 1)]
_FMIX_1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_2 = np.uint64(0xC4CEB9FE1A85EC53)
_SHIFT = np.uint64(33)


def fingerprints(packed: bytes | bytearray | memoryview, key_size: int) -> np.ndarray:
    """(n,) uint64 fingerprints of the keys packed back to back in `packed`.

    The caller has checked that 1 <= key_size <= MAX_KEY_SIZE and len(packed) % key_size == 0.
    """
    raw = np.frombuffer(packed, dtype=np.uint8)
    n = raw.size // key_size
    words = (key_size + 7) // 8
    if key_size % 8:
        padded = np.zeros((n, words * 8), dtype=np.uint8)
        padded[:, :key_size] = raw.reshape(n, key_size)
        raw = padded
    # Array arithmetic on uint64 wraps silently (numpy warns only for scalars).
    h = raw.reshape(n, words * 8).view("<u8") @ _MULTIPLIERS[:words]
    h += _LENGTH_SEEDS[key_size]
    h ^= h >> _SHIFT
    h *= _FMIX_1
    h ^= h >> _SHIFT
    h *= _FMIX_2
    h ^= h >> _SHIFT
    h |= LIVE_BIT
    return h
