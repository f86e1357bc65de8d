"""An `AgentClient`'s lookups (Locate, Unpin) on the agent's data channel: one round trip on a
pooled connection instead of a Python gRPC call, where the agent offers them (FEATURE_AGENT in
its data channel's hello reply). Otherwise, and when the data channel is off, every method
answers None and the caller asks over gRPC."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Sequence

from kvpool.cachenode.client.buffers import BufferPool
from kvpool.cachenode.client.control_ops import NoControlOps, control_request
from kvpool.cachenode.client.datachannel import DataChannel
from kvpool.cachenode.core.errors import Unavailable
from kvpool.cachenode.core.validation import check_keys
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb

CONNECTIONS = 2


def _no_buffers() -> BufferPool:
    raise Unavailable("the agent's control connections receive no values")


class AgentControl:
    """Thread-safe. `hello()` makes the CacheNode Hello call to the agent (over gRPC)."""

    def __init__(
        self,
        host: str,
        url: str,
        hello: Callable[[], pb.HelloResponse],
        *,
        timeout: float,
        tls: ssl.SSLContext | None,
    ) -> None:
        self._call_hello = hello
        self._hello: pb.HelloResponse | None = None
        self._lock = threading.Lock()
        self._data = DataChannel(
            host,
            url,
            self._session,
            self._forget,
            _no_buffers,
            timeout=timeout,
            tls=tls,
            max_idle=CONNECTIONS,
        )
        self._url = url

    def close(self) -> None:
        self._data.close()

    def locate(self, keys: list[bytes], lease_ms: int, lease_id: int) -> tuple[int, int] | None:
        """(count, lease id) as the Agent service's Locate answers it; None: ask over gRPC."""
        if not self._on(keys):
            return None
        try:
            request = control_request(dp.OP_LOCATE, keys, self._url, lease_ms, lease_id)
            count, lease_id, _ = self._data.pipeline([request])[0]
        except NoControlOps:
            return None
        return count, lease_id

    def unpin(self, lease_id: int, keys: list[bytes]) -> int | None:
        if not self._on(keys):
            return None
        try:
            return self._data.pipeline([control_request(dp.OP_UNPIN, keys, self._url, lease_id)])[0]
        except NoControlOps:
            return None

    def _on(self, keys: Sequence[bytes]) -> bool:
        hello = self._session()
        if not hello.data_port or not self._data.supports(dp.FEATURE_AGENT):
            return False
        check_keys(keys, hello.max_batch_keys)  # refused here, as the agent would: no connection lost
        return True

    def _session(self) -> pb.HelloResponse:
        if self._hello is None:
            with self._lock:
                if self._hello is None:
                    self._hello = self._call_hello()
        return self._hello

    def _forget(self, hello: pb.HelloResponse) -> None:
        """The agent restarted at this address: a new session token."""
        with self._lock:
            if self._hello is hello:
                self._hello = None
