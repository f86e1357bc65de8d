"""Between protobuf messages and the index: packed keys → fingerprints, checked holder fields.

Everything received is checked here before the index is touched: key sizes, counts, holder
fields. A bad request raises InvalidRequest with a one-line reason and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.fingerprint import fingerprints
from kvpool.cachenode.core.holders import KINDS, HolderInfo
from kvpool.cachenode.core.record import MAX_KEY_SIZE
from kvpool.cachenode.rpc.proto import lookup_pb2 as pb

MAX_HOLDER_ID = 253  # a DNS name: pod names and node ids fit
MAX_TIER = 32
MAX_ADDRESS = 512

_NO_FPS = np.empty(0, np.uint64)


def key_count(block: pb.LookupKeys) -> int:
    """How many keys a block carries; InvalidRequest if its size or length is wrong."""
    size = block.key_size
    if not 1 <= size <= MAX_KEY_SIZE:
        raise InvalidRequest(f"key_size must be 1..{MAX_KEY_SIZE}, got {size}")
    if len(block.keys) % size:
        raise InvalidRequest(f"{len(block.keys)} bytes of keys is not a multiple of key_size {size}")
    return len(block.keys) // size


def block_fingerprints(blocks: Iterable[pb.LookupKeys], limit: int, what: str) -> np.ndarray:
    """Fingerprints of every key in the blocks, in order; at most `limit` keys."""
    blocks = list(blocks)
    total = sum(key_count(b) for b in blocks)
    if total > limit:
        raise InvalidRequest(f"{what} has {total} keys, the limit is {limit}")
    parts = [fingerprints(b.keys, b.key_size) for b in blocks if b.keys]
    if not parts:
        return _NO_FPS
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def pack_keys(keys: Sequence[bytes]) -> list[pb.LookupKeys]:
    """Keys as blocks of one size each (one block in the usual case: chunk keys are 32 bytes).

    Order is kept within a size; callers that need one ordered list (queries) use `pack_ordered`.
    """
    by_size: dict[int, list[bytes]] = {}
    for key in keys:
        by_size.setdefault(len(key), []).append(key)
    return [pb.LookupKeys(key_size=size, keys=b"".join(group)) for size, group in by_size.items()]


def pack_ordered(keys: Sequence[bytes]) -> pb.LookupKeys:
    """One block for a query: every key must have the same size."""
    if not keys:
        return pb.LookupKeys(key_size=32, keys=b"")
    size = len(keys[0])
    if any(len(k) != size for k in keys):
        raise InvalidRequest("the keys of one query must all have the same size")
    if not 1 <= size <= MAX_KEY_SIZE:
        raise InvalidRequest(f"keys must be 1..{MAX_KEY_SIZE} bytes, got {size}")
    return pb.LookupKeys(key_size=size, keys=b"".join(keys))


def holder_info(message: pb.LookupHolder) -> HolderInfo:
    holder_id = check_holder_id(message.holder_id)
    if message.kind not in KINDS:
        raise InvalidRequest(f"holder kind must be one of {', '.join(KINDS)}, got {message.kind!r}")
    if not 0 < len(message.tier) <= MAX_TIER:
        raise InvalidRequest(f"holder tier must be 1..{MAX_TIER} characters")
    if len(message.address) > MAX_ADDRESS:
        raise InvalidRequest(f"holder address must be at most {MAX_ADDRESS} characters")
    return HolderInfo(holder_id, message.kind, message.tier, message.address)


def check_holder_id(holder_id: str) -> str:
    if not 0 < len(holder_id) <= MAX_HOLDER_ID or not holder_id.isprintable() or " " in holder_id:
        raise InvalidRequest(f"holder_id must be 1..{MAX_HOLDER_ID} printable characters without spaces")
    return holder_id


def holder_message(info: HolderInfo) -> pb.LookupHolder:
    return pb.LookupHolder(holder_id=info.holder_id, kind=info.kind, tier=info.tier, address=info.address)
