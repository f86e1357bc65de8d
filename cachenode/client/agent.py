"""`AgentClient`: a process in the agent's pod (the connector) using the agent's arena directly.

Control over gRPC (the `Agent` service; Locate and Unpin on the agent's data channel where it
offers them, agent_control.py); chunk bytes through the arena file, mapped here once:
a get copies each value out of the arena at the offsets the agent leased, then ends the lease;
a put writes into reserved ranges, then commits with a checksum per value (nothing is stored
unless every checksum matches). A lease is used only within half its TTL: a caller that stalled
longer treats the transfer as failed rather than read a range the agent may have reused.

The agent restarting (a new arena, a new `arena_id` in every lease) is noticed at the next lease,
which maps the new arena and goes on; the vLLM process restarting maps the same arena again and
finds everything the agent still holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

import grpc

from kvpool.cachenode.client import arena_file
from kvpool.cachenode.client.agent_control import AgentControl
from kvpool.cachenode.client.arena import Region
from kvpool.cachenode.client.lookup import open_channel
from kvpool.cachenode.core.errors import BadReply, InvalidRequest, NotInThisPod, Unavailable
from kvpool.cachenode.core.record import checksum
from kvpool.cachenode.core.urls import parse_urls
from kvpool.cachenode.core.validation import check_key, check_value_size
from kvpool.cachenode.rpc.channels import bearer_metadata, trust
from kvpool.cachenode.rpc.proto import agent_pb2 as pb
from kvpool.cachenode.rpc.proto import agent_pb2_grpc as pb_grpc
from kvpool.cachenode.rpc.proto import kvpool_pb2, kvpool_pb2_grpc
from kvpool.cachenode.rpc.status import translate

DEFAULT_TIMEOUT_S = 10.0
USE_WITHIN = 0.5  # of a lease's TTL
DONE_WAIT_S = 1.0  # the longest close() waits for the Done calls still in flight


def hello(url: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, tls_ca_file=None):
    """The CacheNode Hello of the server at `url` (`kind` is "agent" for an agent)."""
    channel = open_channel(url, tls_ca_file)
    try:
        return kvpool_pb2_grpc.CacheNodeStub(channel).Hello(
            kvpool_pb2.HelloRequest(client="kvpool-agent-client"),
            timeout=timeout,
            metadata=bearer_metadata(token),
        )
    except grpc.RpcError as exc:
        raise translate(exc) from None
    finally:
        channel.close()


class AgentClient:
    """Thread-safe; one per process and agent. Use as a context manager or call close()."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls_ca_file: str | None = None,
        name: str = "kvpool-python",
        use_data_channel: bool = True,
    ) -> None:
        """`use_data_channel`: Locate and Unpin on the agent's data channel where it offers them
        (one round trip, no gRPC call); gRPC otherwise."""
        seeds, tls = parse_urls(url)
        if len(seeds) != 1:
            raise InvalidRequest(f"an agent is one URL, got {url!r}")
        self.url = url
        self._name = name
        self._timeout = timeout
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(url, tls_ca_file)
        self._stub = pb_grpc.AgentStub(self._channel)
        self._node = kvpool_pb2_grpc.CacheNodeStub(self._channel)
        self._lock = threading.Lock()
        self._arena: tuple[pb.AgentAttachResponse, Region] | None = None
        self._ending: set = set()  # Done calls in flight (kept referenced until they finish)
        self._control = (
            AgentControl(
                seeds[0][0],
                url,
                lambda: self._call(self._node.Hello, kvpool_pb2.HelloRequest(client=self._name)),
                timeout=timeout,
                tls=trust(tls_ca_file)[1] if tls else None,
            )
            if use_data_channel
            else None
        )

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._let_done_calls_finish(min(self._timeout, DONE_WAIT_S))
        self._detach()
        if self._control is not None:
            self._control.close()
        self._channel.close()

    def _let_done_calls_finish(self, timeout: float) -> None:
        """Wait up to `timeout` for the Done calls still in flight: closing the channel cancels
        them, and their leases would stay pinned in the agent until their TTL."""
        with self._lock:
            pending = list(self._ending)
        deadline = time.monotonic() + timeout
        for future in pending:
            with contextlib.suppress(Exception):  # failed or late: the TTL ends that lease
                future.result(timeout=max(0.0, deadline - time.monotonic()))

    # -- the arena -----------------------------------------------------------------------------

    def attach(self) -> pb.AgentAttachResponse:
        """Map the agent's arena (once); NotInThisPod if its file is not the agent's here."""
        with self._lock:
            if self._arena is not None:
                return self._arena[0]
        info = self._call(self._stub.Attach, pb.AgentAttachRequest(client=self._name))
        try:
            region = Region(0, info.arena_path, create=False)
        except OSError as exc:
            raise NotInThisPod(
                f"the arena {info.arena_path} of agent {info.agent_id} cannot be opened here "
                f"({exc.strerror or exc}): the agent runs in another pod or host"
            ) from None
        try:
            fd = os.open(info.arena_path, os.O_RDONLY)
            try:
                same = arena_file.identity(fd) == info.arena_identity
            finally:
                os.close(fd)
        except OSError:
            same = False
        if not same or region.capacity != info.arena_size:
            region.close(unlink=False)
            raise NotInThisPod(f"{info.arena_path} here is not the arena of agent {info.agent_id}")
        with self._lock:
            if self._arena is None:
                self._arena = (info, region)
                return info
        region.close(unlink=False)  # another thread attached meanwhile
        return self._arena[0]

    @property
    def agent_id(self) -> str:
        return self.attach().agent_id

    def _region(self, lease: pb.AgentLease, count: int) -> Region:
        """The mapping a lease's offsets are in (a restarted agent's new arena is mapped now);
        checks the lease's shape."""
        info = self.attach()
        if lease.arena_id != info.arena_id:
            self._detach()  # the agent restarted: its arena is a new file
            info = self.attach()
            if lease.arena_id != info.arena_id:
                raise Unavailable(f"agent {info.agent_id} restarted during the call")
        with self._lock:
            region = self._arena[1] if self._arena else None
        if region is None:
            raise Unavailable(f"{self.url}: the arena was closed")
        if len(lease.sizes) != count or len(lease.offsets) != count:
            raise BadReply(f"{self.url}: lease of {len(lease.sizes)} values for {count} keys")
        for size, offset in zip(lease.sizes, lease.offsets, strict=True):
            if size >= 0 and offset + size > region.capacity:
                raise BadReply(f"{self.url}: range [{offset}, {offset + size}) is outside the arena")
        return region

    def _detach(self) -> None:
        """Unmap the arena (a restarted agent's old one: its memory is freed once unmapped here; a
        copy still running from it keeps the mapping until it is done, then fails as a miss)."""
        with self._lock:
            arena, self._arena = self._arena, None
        if arena is not None:
            arena[1].close(unlink=False)

    # -- lookups -------------------------------------------------------------------------------

    def prefix_hits(self, keys: Sequence[bytes]) -> int:
        """Leading keys the agent can deliver (its arena, its peers, the cache nodes)."""
        return self.lease_prefix(keys, 0)[0]

    def lease_prefix(
        self, keys: Sequence[bytes], lease_ms: int, lease_id: int | None = None
    ) -> tuple[int, int]:
        """prefix_hits that pins what the agent holds (and the nodes hold) for `lease_ms`;
        (count, lease id), the id 0 when nothing was pinned."""
        keys = [check_key(k) for k in keys]
        if not keys:
            return 0, 0
        lease_id = (lease_id or secrets.randbits(63) | 1) if lease_ms else 0
        if not 0 <= lease_ms < 1 << 32:
            raise InvalidRequest(f"lease_ms {lease_ms} out of range")
        located = self._control.locate(keys, int(lease_ms), lease_id) if self._control else None
        if located is not None:
            return located
        request = pb.AgentLocateRequest(keys=keys, lease_ms=int(lease_ms), lease_id=lease_id)
        reply = self._call(self._stub.Locate, request)
        if reply.count > len(keys):
            raise BadReply(f"{self.url}: prefix of {reply.count} for {len(keys)} keys")
        return reply.count, reply.lease_id

    def release(self, lease_id: int, keys: Sequence[bytes] | None = None) -> int:
        keys = [check_key(k) for k in keys or ()]
        if not 0 <= lease_id < 1 << 64:
            raise InvalidRequest(f"lease id {lease_id} out of range")
        unpinned = self._control.unpin(lease_id, keys) if self._control else None
        if unpinned is not None:
            return unpinned
        return self._call(self._stub.Unpin, pb.AgentUnpinRequest(lease_id=lease_id, keys=keys)).count

    # -- values --------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """The values the agent has or fetches, copied out of the arena; missing keys are absent."""
        keys = list(dict.fromkeys(check_key(k) for k in keys))
        if not keys:
            return {}
        found: dict[bytes, bytes] = {}
        for batch in _batches(keys, self.attach().max_batch_keys):
            started = time.monotonic()
            lease = self._call(self._stub.Get, pb.AgentGetRequest(keys=batch))
            if not lease.lease_id:
                continue  # nothing held: no range to read
            try:
                region = self._region(lease, len(batch))
                got = {
                    key: bytes(region.slice(offset, size))
                    for key, size, offset in zip(batch, lease.sizes, lease.offsets, strict=True)
                    if size >= 0
                }
            finally:
                self._done(lease)
            if time.monotonic() - started > USE_WITHIN * lease.ttl_ms / 1000:
                raise Unavailable(f"reading from the arena of {self.url} took longer than half its lease")
            found.update(got)
        return found

    def put_many(self, items: Mapping[bytes, object] | Iterable[tuple[bytes, object]]) -> int:
        """Write values into the arena and commit them; returns how many were stored."""
        pairs = items.items() if isinstance(items, Mapping) else items
        checked = [(check_key(k), memoryview(v).cast("B")) for k, v in pairs]
        if not checked:
            return 0
        info = self.attach()
        for _, view in checked:
            check_value_size(view.nbytes, info.max_value_size)
        stored = 0
        for batch in _batches(checked, info.max_batch_keys):
            started = time.monotonic()
            entries = [pb.AgentPutEntry(key=k, size=v.nbytes) for k, v in batch]
            lease = self._call(self._stub.Reserve, pb.AgentReserveRequest(entries=entries))
            try:
                region = self._region(lease, len(batch))
                for (_, view), size, offset in zip(batch, lease.sizes, lease.offsets, strict=True):
                    if size != view.nbytes:
                        raise BadReply(f"{self.url}: reserved {size} bytes for a {view.nbytes}-byte value")
                    region.view[offset : offset + size] = view
                sums = [checksum(k, v) for k, v in batch]
                if time.monotonic() - started > USE_WITHIN * lease.ttl_ms / 1000:
                    raise Unavailable(f"writing into the arena of {self.url} took longer than half its lease")
            except BaseException:
                self._done(lease)
                raise
            request = pb.AgentCommitRequest(lease_id=lease.lease_id, token=lease.token, checksums=sums)
            stored += self._call(self._stub.Commit, request).stored
        return stored

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove keys from the agent's arena (not from its peers or the cache nodes)."""
        request = kvpool_pb2.KeysRequest(keys=[check_key(k) for k in keys])
        return self._call(self._node.Delete, request).count

    def stats(self) -> dict:
        return json.loads(self._call(self._node.Stats, kvpool_pb2.StatsRequest()).json)

    # -- gRPC ----------------------------------------------------------------------------------

    def _done(self, lease: pb.AgentLease) -> None:
        """End a lease without waiting for the answer (its TTL ends it if this is lost)."""
        if not lease.lease_id:
            return
        request = pb.AgentDoneRequest(lease_id=lease.lease_id, token=lease.token)
        try:
            future = self._stub.Done.future(request, timeout=self._timeout, metadata=self._metadata)
        except (grpc.RpcError, ValueError):  # the channel is closed
            return
        with self._lock:
            self._ending.add(future)
        future.add_done_callback(self._ended)

    def _ended(self, future) -> None:
        with self._lock:
            self._ending.discard(future)

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise translate(exc) from None


def _batches(items: list, size: int):
    size = max(1, size)
    for start in range(0, len(items), size):
        yield items[start : start + size]
