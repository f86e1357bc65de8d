"""The embedded pool: a cache node inside a vLLM worker process, for an engine run without a
pool URL (KVPOOL_URL unset).

vLLM's CPU and GPU executors run the worker (which moves the bytes) in another process than the
scheduler (which only asks "how many leading chunks are there?"). So the worker owns the store —
loads and saves stay in-process memory copies — and serves lookups to the scheduler through a
loopback kvpool node whose address it leaves in a rendezvous file named after the engine id and
data-parallel rank (both processes know them from the shared config). Under tensor/pipeline
parallelism the first worker (TP 0, PP 0) owns the pool and the other workers reach it the way
the scheduler does (connector/pools.py, ``RendezvousPool``): one pool per engine, each rank with
its own keys.

This is server code: the connector opens it in one place (connector/backend.py), lazily, and a
vLLM pod's payload, which carries no server modules, has none.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.server.node import CacheNode
from kvpool.cachenode.server.tiers.store import TieredStore


class EmbeddedPool:
    """The connector's pool calls (connector/pools.py, ``Pool``) on a ``TieredStore`` in this
    process. Reads are views of the store's memory (no copy)."""

    def __init__(self, store: TieredStore, name: str) -> None:
        self._store = store
        self.name = name

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._store.prefix_hits(list(keys))

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]:
        return self._store.lease_prefix(list(keys), lease_ms / 1000)

    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None:
        self._store.release(lease_id, None if keys is None else list(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        return list(self._store.get_many(list(keys)))

    def put_many(self, items: list[tuple[bytes, object]]) -> None:
        """The store owns what it is given: its disk tier writes it later, from another thread.
        Views of the caller's buffers (the saver's, reused once this returns) are copied first
        where a disk tier will read them after the call; L1 copies into its arena during it."""
        if self._store.disk is not None:
            items = [(k, v if isinstance(v, bytes) else bytes(v)) for k, v in items]
        self._store.put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._store.delete(list(keys))

    def close(self) -> None:
        self._store.close()


class LocalNodePool(EmbeddedPool):
    """The embedded pool, served to the engine's other processes over loopback; its address is
    left in the file ``rendezvous`` (removed again at close, if still ours)."""

    def __init__(self, memory_bytes: int, disk_dir: str | None, disk_bytes: int, rendezvous: str) -> None:
        ns = NodeSettings(
            host="127.0.0.1", port=0, http_port=0, data_port=0, memory=memory_bytes,
            disk_dir=Path(disk_dir) if disk_dir else None, disk_size=disk_bytes if disk_dir else 0,
        )  # fmt: skip
        self._node = CacheNode(ns)
        self._node.start(wait_ready=True)
        super().__init__(self._node.store, "embedded pool" + (f" (disk {disk_dir})" if disk_dir else ""))
        self.url = self._node.url
        self._rendezvous = rendezvous
        tmp = f"{rendezvous}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.url)
        os.replace(tmp, rendezvous)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            with open(self._rendezvous) as f:
                mine = f.read() == self.url
            if mine:
                os.unlink(self._rendezvous)
        self._node.stop()
