"""Checks on what clients send; pure, shared by the gRPC service and the data channel."""

from __future__ import annotations

from collections.abc import Sequence

from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.record import MAX_KEY_SIZE


def check_key(key: bytes | bytearray | memoryview) -> bytes:
    """The key as bytes, or InvalidRequest: keys are 1..64 bytes."""
    if not isinstance(key, bytes | bytearray | memoryview):
        raise InvalidRequest(f"key must be bytes, got {type(key).__name__}")
    key = bytes(key)
    if not 0 < len(key) <= MAX_KEY_SIZE:
        raise InvalidRequest(f"key must be 1..{MAX_KEY_SIZE} bytes, got {len(key)}")
    return key


def check_keys(keys: Sequence[bytes], max_batch_keys: int) -> None:
    if len(keys) > max_batch_keys:
        raise InvalidRequest(f"batch has {len(keys)} keys, the limit is {max_batch_keys}")
    for key in keys:
        check_key(key)


def check_value_size(size: int, max_value_size: int) -> None:
    if size < 0:
        raise InvalidRequest(f"value size must not be negative, got {size}")
    if size > max_value_size:
        raise InvalidRequest(f"value of {size} bytes exceeds the node's --max-value-size of {max_value_size}")
