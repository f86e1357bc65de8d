"""The pools the connector can read and write, each behind the same few calls (``Pool``): the
agent in this pod (its shared-memory arena), a remote pool over gRPC, and, from another process,
the embedded pool a vLLM worker serves (its server side is cachenode/server/embedded.py).

Reads may hand out ``Held`` values (``get_many_into``): a view of the bytes plus ``release()``. A
remote pool receives each value straight into the client's pooled, page-aligned receive buffers
(pinned where CUDA is), so the connector allocates nothing per chunk; ``release()`` returns the
buffer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class Held(Protocol):
    """A value read from a pool: ``view`` is valid until ``release()`` (a pooled receive buffer
    goes back to its pool then; call it once the bytes have been copied out)."""

    view: memoryview | None

    def release(self) -> None: ...


class Borrowed:
    """A value that is no pooled buffer (a view of the embedded pool's memory, or bytes): holding
    the view keeps the memory alive, releasing drops it."""

    __slots__ = ("view",)

    def __init__(self, value) -> None:
        self.view: memoryview | None = memoryview(value)

    def release(self) -> None:
        self.view = None


class Pool(Protocol):
    """The few operations the connector needs; values are whole encoded chunks.
    ``get_many_into`` is optional: without it, ``SafePool`` wraps ``get_many``'s values."""

    name: str

    def prefix_hits(self, keys: Sequence[bytes]) -> int: ...
    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]: ...
    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None: ...
    def get_many(self, keys: Sequence[bytes]) -> list[object | None]: ...
    def put_many(self, items: list[tuple[bytes, bytes]]) -> None: ...
    def delete(self, keys: Sequence[bytes]) -> None: ...
    def close(self) -> None: ...


class LazyPool:
    """A pool found at its first call, every call then forwarded to it. Finding it may fail (a
    sidecar still starting, a rendezvous file not written yet): the error is that call's, and
    the next call tries again. Subclasses say how to find it (``_open``)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._found: Pool | None = None
        self._lock = threading.Lock()

    def _open(self) -> Pool:
        raise NotImplementedError

    def _pool(self) -> Pool:
        if self._found is None:
            with self._lock:
                if self._found is None:
                    self._found = self._open()
        return self._found

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._pool().prefix_hits(keys)

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]:
        return self._pool().lease_prefix(keys, lease_ms)

    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None:
        self._pool().release(lease_id, keys)

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        return self._pool().get_many(keys)

    def get_many_into(self, keys: Sequence[bytes]) -> list[Held | None]:
        """The found pool's pooled-buffer read when it has one (a remote pool), else its values
        as ``Borrowed``."""
        pool = self._pool()
        get = getattr(pool, "get_many_into", None)
        if get is not None:
            return get(keys)
        return [None if v is None else Borrowed(v) for v in pool.get_many(keys)]

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self._pool().put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._pool().delete(keys)

    def close(self) -> None:
        if self._found is not None:
            self._found.close()


class _ClientPool:
    """A pool behind a kvpool client object (the routing pool client or the agent client): both
    answer the same calls with dicts keyed by chunk key."""

    def __init__(self, client, name: str) -> None:
        self._client = client
        self.name = name

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        return self._client.prefix_hits(list(keys))

    def lease_prefix(self, keys: Sequence[bytes], lease_ms: int) -> tuple[int, int]:
        return self._client.lease_prefix(list(keys), lease_ms)

    def release(self, lease_id: int, keys: Sequence[bytes] | None) -> None:
        self._client.release(lease_id, None if keys is None else list(keys))

    def get_many(self, keys: Sequence[bytes]) -> list[object | None]:
        found = self._client.get_many(list(keys))
        return [found.get(k) for k in keys]

    def put_many(self, items: list[tuple[bytes, bytes]]) -> None:
        self._client.put_many(items)

    def delete(self, keys: Sequence[bytes]) -> None:
        self._client.delete(list(keys))

    def close(self) -> None:
        self._client.close()


class RemotePool(_ClientPool):
    """A node, an agent or ``kvpool up`` reached through the kvpool client."""

    def __init__(self, url: str, timeout: float, token: str | None = None) -> None:
        from kvpool.cachenode.client.pool import Client

        super().__init__(Client(url, timeout=timeout, token=token), url)

    def get_many_into(self, keys: Sequence[bytes]) -> list[Held | None]:
        """Each value received straight into a pooled receive buffer of the client."""
        found = self._client.get_many_into(list(keys))
        return [found.pop(k, None) for k in keys]  # a key asked twice is found once


class AgentPool(_ClientPool):
    """The agent in this pod (`kvpool agent`): lookups over gRPC, chunk bytes through the agent's
    shared-memory arena (mapped here; `AgentClient`), so they never cross gRPC in the pod. The
    agent answers lookups for its peers and the cache nodes too, and fetches on a get."""

    def __init__(self, client) -> None:
        super().__init__(client, f"agent {client.agent_id} ({client.url}, shared memory)")


class UrlPool(LazyPool):
    """The pool at KVPOOL_URL: the agent in this pod when the server's Hello says it is an agent
    and its arena file maps here (``AgentPool``); anything else — nodes, `kvpool up`, an agent of
    another pod — through the kvpool client (``RemotePool``). Decided at the first call; a server
    not reachable yet (a sidecar still starting) is asked again at the next one."""

    def __init__(self, url: str, timeout: float, token: str | None = None) -> None:
        super().__init__(url)
        self._url = url
        self._timeout = timeout
        self._token = token

    def _open(self) -> Pool:
        pool = self._choose()
        self.name = pool.name
        return pool

    def _choose(self) -> Pool:
        from kvpool.cachenode.client.agent import AgentClient, NotInThisPod, hello
        from kvpool.cachenode.core.urls import parse_urls

        if (
            len(parse_urls(self._url)[0]) == 1
            and hello(self._url, token=self._token, timeout=self._timeout).kind == "agent"
        ):
            client = AgentClient(
                self._url, token=self._token, timeout=self._timeout, name=f"connector (pid {os.getpid()})"
            )
            try:
                client.attach()
            except NotInThisPod as exc:
                client.close()
                log.info("kvpool: %s; reaching the agent over the network instead", exc)
            except BaseException:
                client.close()
                raise
            else:
                log.info("kvpool: using agent %s through its shared-memory arena", client.agent_id)
                return AgentPool(client)
        return RemotePool(self._url, self._timeout, self._token)


class RendezvousPool(LazyPool):
    """Another process's view of a worker-owned embedded pool (the scheduler's lookups, the other
    tensor/pipeline-parallel workers' loads and saves), found through the rendezvous file."""

    def __init__(self, rendezvous: str, timeout: float) -> None:
        super().__init__("embedded pool")
        self._rendezvous = rendezvous
        self._timeout = timeout

    def _open(self) -> RemotePool:
        with open(self._rendezvous) as f:  # missing → an error → a miss
            return RemotePool(f.read().strip(), self._timeout)
