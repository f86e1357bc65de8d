"""The disk tier's files: where a record lives, how it is written durably and read back verified.

Why it is shaped this way:
- each file holds the record frame of record.py (header, key, value) so a read verifies itself;
- writes go to a temporary file in the same directory, are fsynced, then renamed over the final
  name and the directory fsynced: a crash leaves either the old record, the new one, or a stray
  temporary file that the next start removes;
- file names are the key in hex, sharded into 256 directories by a hash of the key, so the index
  is rebuilt from ``os.scandir`` and stat alone, without opening a file.

No budget, no index, no locks here: that is disk.py.
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import xxhash

from kvpool.cachenode.core.record import HEADER_SIZE, RecordError, decode_header
from kvpool.cachenode.server.tiers.memory import nbytes

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".rec"
TEMP_SUFFIX = ".tmp"
SHARDS = 256
READ_PIECE = 1024 * 1024  # read and hash values in pieces that stay in the CPU cache


def shard_of(key: bytes) -> str:
    return f"{xxhash.xxh3_64_intdigest(key) & (SHARDS - 1):02x}"


def record_size(key: bytes, value_len: int) -> int:
    """Bytes a record file takes (what the budget counts)."""
    return HEADER_SIZE + len(key) + value_len


def record_path(directory: str, key: bytes) -> str:
    return os.path.join(directory, shard_of(key), key.hex() + RECORD_SUFFIX)


def temp_path(final: str, key: bytes) -> str:
    """A temporary name beside `final`, unique to one write."""
    return os.path.join(os.path.dirname(final), f".{key.hex()}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}")


def scan_records(directory: str) -> list[tuple[float, bytes, int]]:
    """(mtime, key, size) of every record file, from scandir and stat alone; stray temporary
    files (writes that never reached their rename) are removed on the way."""
    found: list[tuple[float, bytes, int]] = []
    with os.scandir(directory) as top:
        shard_dirs = [e.path for e in top if len(e.name) == 2 and e.is_dir(follow_symlinks=False)]
    for shard_dir in shard_dirs:
        shard = os.path.basename(shard_dir)
        with os.scandir(shard_dir) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(TEMP_SUFFIX):
                    unlink(entry.path)
                    continue
                if not name.endswith(RECORD_SUFFIX):
                    continue
                try:
                    key = bytes.fromhex(name[: -len(RECORD_SUFFIX)])
                except ValueError:
                    continue
                if not key or shard_of(key) != shard:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                found.append((st.st_mtime, key, st.st_size))
    return found


def write_temp(temp: str, header: bytes, value, *, fsync: bool) -> None:
    """Write header and value to a new file `temp` (its shard directory made when missing)."""
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(temp), exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, [header, value])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_record(fd: int, key: bytes, size: int, *, verify: bool = True) -> memoryview:
    """The value of the record file open at `fd` (`size` bytes long), in a fresh read-only
    buffer; RecordError when it is not a whole, intact record of `key`."""
    head_len = HEADER_SIZE + len(key)
    head = bytearray(head_len)
    _read_exact(fd, memoryview(head), 0)
    header = decode_header(head)
    if header.key_len != len(key) or bytes(head[HEADER_SIZE:]) != key:
        raise RecordError("record belongs to another key")
    if header.total_size != size:
        raise RecordError(f"record file is {size} bytes, header says {header.total_size}")
    value = np.empty(header.value_len, dtype=np.uint8)  # not zero-filled, unlike bytearray
    view = memoryview(value)
    if not verify:
        _read_exact(fd, view, head_len)
        return view.toreadonly()
    # Hash each piece right after reading it, while it is still in the CPU cache: for large
    # values this costs a fraction of hashing the whole buffer again from memory.
    hasher = xxhash.xxh3_64(key)
    for start in range(0, len(view), READ_PIECE):
        piece = view[start : start + READ_PIECE]
        _read_exact(fd, piece, head_len + start)
        hasher.update(piece)
    if hasher.intdigest() != header.checksum:
        raise RecordError("checksum mismatch")
    return view.toreadonly()


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("Disk tier could not remove %s: %s", path, exc)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, buffers: list) -> None:
    """os.writev until every byte is written (writev may write less than asked)."""
    views = [memoryview(b).cast("B") for b in buffers if nbytes(b)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _read_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short file is a corrupt record."""
    done = 0
    total = len(view)
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise RecordError(f"record truncated: {offset + done} bytes of {offset + total}")
        done += n
