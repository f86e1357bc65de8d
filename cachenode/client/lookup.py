"""`LookupClient`: ask a lookup service who holds a key list's prefix, or for routing scores.

Locate and Scores take the service's lean query channel (client/lookup_channel.py: one TCP
round trip, pipelining) once a gRPC Hello has named it and a connection to it succeeded; until
then, with a service that has none (older ones), and whenever the channel fails, the same query
goes over gRPC. Stats and holders' calls are gRPC only.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import grpc

from kvpool.cachenode.client.lookup_channel import ChannelDown, QueryChannel, QueryConnection
from kvpool.cachenode.core.errors import InvalidRequest, NotALookupService, Unavailable, Unimplemented
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.located import HolderMatch, Located, Score
from kvpool.cachenode.core.urls import parse_url
from kvpool.cachenode.rpc import lookup_wire as wire
from kvpool.cachenode.rpc import lookupproto as lp
from kvpool.cachenode.rpc.channels import bearer_metadata, open_url, trust
from kvpool.cachenode.rpc.proto import lookup_pb2 as pb
from kvpool.cachenode.rpc.proto import lookup_pb2_grpc as pb_grpc
from kvpool.cachenode.rpc.status import translate

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
TRANSPORTS = ("auto", "tcp", "grpc")
CHANNEL_RETRY_S = 10.0  # after connecting the query channel failed, gRPC only for this long ...
CHANNEL_RETRY_MAX_S = 300.0  # ... doubling at each further failure up to this
CHANNEL_REPAIR_S = 1.0  # after a working channel broke (the service restarted?), try again this soon
DEFAULT_WINDOW = 16
MESSAGE_LIMIT = 16 * 1024 * 1024
RECONNECT_BACKOFF_MAX_MS = 1000
# Shared by the clients of small control services (lookup, publisher, agent).
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ("grpc.max_send_message_length", MESSAGE_LIMIT),
    # Holders must find a restarted service within a fraction of their lease.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
)


def open_channel(url: str, tls_ca_file: str | None = None) -> grpc.Channel:
    """A channel to grpc://host:port or grpcs://host:port (CA: `tls_ca_file`, KVPOOL_TLS_CA_FILE,
    else the system roots)."""
    return open_url(url, CHANNEL_OPTIONS, tls_ca_file)


def holder_info(message: pb.LookupHolder) -> HolderInfo:
    return HolderInfo(message.holder_id, message.kind, message.tier, message.address)


def holders_of(located: Located, j: int) -> list[HolderInfo]:
    """The holders of key j of the located prefix (decoded from the per-holder bitmaps)."""
    if not 0 <= j < located.prefix:
        return []
    return [m.info for m in located.holders if m.bitmap[j // 8] >> (j % 8) & 1]


class LookupClient:
    """Thread-safe; reuse one per process. Errors raise kvpool's KVPoolError subclasses.

    `transport`: "auto" (the query channel once it is up, connected in the background; gRPC
    until then and whenever it fails), "tcp" (the query channel only: connect at the first call,
    raise Unavailable when it fails) or "grpc" (never the query channel)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls_ca_file: str | None = None,
        transport: str = "auto",
    ) -> None:
        if transport not in TRANSPORTS:
            raise InvalidRequest(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.url = url
        self._timeout = timeout
        self._transport = transport
        self._metadata = bearer_metadata(token)
        self._host, _, tls = parse_url(url)
        self._tls_context = trust(tls_ca_file)[1] if tls and transport != "grpc" else None
        self._channel = open_channel(url, tls_ca_file)
        self._stub = pb_grpc.LookupStub(self._channel)
        self._infos = lp.InfoCache()
        self._queries: QueryChannel | None = None
        self._max_query_keys = 0
        self._lock = threading.Lock()
        self._connecting = False
        self._retry_at = 0.0
        self._failures = 0  # failed connects in a row
        self._closed = False

    def __enter__(self) -> LookupClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        queries, self._queries = self._queries, None
        if queries is not None:
            queries.close()
        self._channel.close()

    @property
    def transport_in_use(self) -> str:
        """`tcp` while queries take the query channel, else `grpc`."""
        return "tcp" if self._queries is not None else "grpc"

    def locate(self, keys: Sequence[bytes]) -> Located:
        """The longest prefix of `keys` held somewhere, with its holders (`holders_of(result, j)`)."""
        queries = self._query_channel()
        if queries is not None:
            frame, asked = self._locate_frame(keys)
            try:
                return queries.call(frame, asked, self._decode_located)
            except ChannelDown as exc:
                self._channel_failed(queries, exc)
        return self._locate_grpc(keys)

    def locate_many(self, queries: Iterable[Sequence[bytes]], window: int = DEFAULT_WINDOW) -> list[Located]:
        """`locate` of every key list, in order, with up to `window` queries in flight (pipelined
        on one query-channel connection, else as concurrent gRPC calls)."""
        queries = list(queries)
        channel = self._query_channel()
        if channel is not None:
            frames = [self._locate_frame(keys) for keys in queries]
            try:
                return list(channel.pipeline(frames, self._decode_located, max(1, window)))
            except ChannelDown as exc:
                self._channel_failed(channel, exc)
        return list(self._locate_many_grpc(queries, max(1, window)))

    def locate_stream(
        self, queries: Iterable[Sequence[bytes]], window: int = DEFAULT_WINDOW
    ) -> Iterator[Located]:
        """Like `locate_many`, lazily: the next key list is taken from `queries` just before it is
        sent, and each answer is yielded as it arrives. A failure of the query channel midway
        raises Unavailable (the queries already answered cannot be asked again)."""
        channel = self._query_channel()
        if channel is None:
            yield from self._locate_many_grpc(queries, max(1, window))
            return
        frames = (self._locate_frame(keys) for keys in queries)
        try:
            yield from channel.pipeline(frames, self._decode_located, max(1, window))
        except ChannelDown as exc:
            self._channel_failed(channel, exc)
            raise Unavailable(str(exc)) from None

    def scores(self, keys: Sequence[bytes], tokens_per_key: int, kind: str = "") -> tuple[list[Score], bool]:
        """Per-holder matched tokens, best first, and whether the index was complete (authoritative)."""
        queries = self._query_channel()
        if queries is not None and kind in lp.KIND_CODES and 0 <= tokens_per_key < 1 << 32:
            size, packed = self._pack(keys)
            frame = lp.encode_scores(size, packed, tokens_per_key, kind)

            def decode(head: lp.ReplyHeader, body: bytes) -> tuple[list[Score], bool]:
                return lp.decode_scores(head, body, self._infos, tokens_per_key), head.authoritative

            try:
                return queries.call(frame, len(keys), decode)
            except ChannelDown as exc:
                self._channel_failed(queries, exc)
        request = pb.LookupScoresRequest(
            keys=wire.pack_ordered(keys), tokens_per_key=tokens_per_key, kind=kind
        )
        response = self._call(self._stub.Scores, request)
        ranked = [
            Score(HolderInfo(s.holder_id, s.kind, s.tier, s.address), s.matched_keys, s.matched_tokens)
            for s in response.scores
        ]
        return ranked, response.authoritative

    def stats(self) -> dict:
        return json.loads(self._call(self._stub.Stats, pb.LookupStatsRequest()).json)

    # -- gRPC ----------------------------------------------------------------------------------
    def _locate_grpc(self, keys: Sequence[bytes]) -> Located:
        response = self._call(self._stub.Locate, pb.LookupLocateRequest(keys=wire.pack_ordered(keys)))
        return _located(response)

    def _locate_many_grpc(self, queries: Iterable[Sequence[bytes]], window: int) -> Iterator[Located]:
        pending: collections.deque = collections.deque()
        for keys in queries:
            request = pb.LookupLocateRequest(keys=wire.pack_ordered(keys))
            if len(pending) >= window:
                yield _located(self._result(pending.popleft()))
            pending.append(self._stub.Locate.future(request, timeout=self._timeout, metadata=self._metadata))
        while pending:
            yield _located(self._result(pending.popleft()))

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _result(self, future):
        try:
            return future.result()
        except grpc.RpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.RpcError) -> Exception:
        error = translate(exc)
        if isinstance(error, Unimplemented):
            return NotALookupService(f"{self.url} does not serve kvpool.v1.Lookup")
        return error

    # -- the query channel ---------------------------------------------------------------------
    def _pack(self, keys: Sequence[bytes]) -> tuple[int, bytes]:
        try:
            size, packed = lp.pack_query(keys)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if len(keys) > self._max_query_keys:
            raise InvalidRequest(f"the query has {len(keys)} keys, the limit is {self._max_query_keys}")
        return size, packed

    def _locate_frame(self, keys: Sequence[bytes]) -> tuple[bytes, int]:
        size, packed = self._pack(keys)
        return lp.encode_locate(size, packed), len(keys)

    def _decode_located(self, head: lp.ReplyHeader, body: bytes) -> Located:
        return lp.decode_located(head, body, self._infos)

    def _query_channel(self) -> QueryChannel | None:
        """The query channel if it is up; otherwise start connecting it (in the background for
        "auto", here for "tcp") and answer None (use gRPC)."""
        queries = self._queries
        if queries is not None or self._transport == "grpc" or self._closed:
            return queries
        if self._transport == "tcp":
            with self._lock:
                if self._queries is None:
                    self._open_query_channel()
                return self._queries
        with self._lock:
            if self._connecting or time.monotonic() < self._retry_at:
                return None
            self._connecting = True
        threading.Thread(
            target=self._connect_in_background, name="kvpool-lookup-connect", daemon=True
        ).start()
        return None

    def _connect_in_background(self) -> None:
        try:
            self._open_query_channel()
        except NotALookupService:
            self._retry_at = float("inf")  # not a lookup service at all: gRPC says so on every call
        except Exception as exc:  # any failure means: gRPC for a while
            self._failures += 1
            delay = min(CHANNEL_RETRY_MAX_S, CHANNEL_RETRY_S * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            log.log(
                logging.INFO if self._failures == 1 else logging.DEBUG,
                "lookup service %s: query channel unavailable, using gRPC (next try in %g s): %s",
                self.url,
                delay,
                exc,
            )
        finally:
            self._connecting = False

    def _open_query_channel(self) -> None:
        """Hello over gRPC, then one connection to the channel it names (raises on failure)."""
        try:
            hello = self._stub.Hello(
                pb.LookupHelloRequest(client="kvpool-python"), timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            error = translate(exc)
            if isinstance(error, Unimplemented):
                if self._transport == "tcp":
                    raise Unavailable(f"{self.url} has no query channel (an older lookup service)") from None
                self._retry_at = float("inf")  # an older service: gRPC for good
                return
            raise error from None
        if not hello.query_port:
            if self._transport == "tcp":
                raise Unavailable(f"{self.url} offers no query channel")
            self._retry_at = float("inf")
            return
        host = hello.query_host or self._host

        def connect() -> QueryConnection:
            return QueryConnection(
                host, hello.query_port, hello.query_token, self._timeout, self._tls_context, self._host
            )

        try:
            first = connect()
        except (OSError, ChannelDown, lp.FrameError) as exc:
            raise Unavailable(f"query channel {host}:{hello.query_port} of {self.url}: {exc}") from None
        self._max_query_keys = hello.max_query_keys
        queries = QueryChannel(connect)
        queries.adopt(first)
        if self._closed:
            queries.close()
            return
        self._queries = queries
        self._failures = 0
        log.debug("lookup service %s: queries take the query channel on port %d", self.url, hello.query_port)

    def _channel_failed(self, queries: QueryChannel, exc: ChannelDown) -> None:
        """Back to gRPC: for this call, and until the channel is connected again (a new Hello: the
        service may have restarted with a new port and token)."""
        with self._lock:
            if self._queries is queries:
                self._queries = None
                self._retry_at = time.monotonic() + CHANNEL_REPAIR_S
        queries.close()
        if self._transport == "tcp":  # the next call asks Hello again
            raise Unavailable(str(exc)) from None
        log.info("lookup service %s: %s; using gRPC until the channel is connected again", self.url, exc)


def _located(response: pb.LookupLocateResponse) -> Located:
    return Located(
        response.prefix,
        [HolderMatch(holder_info(m.holder), m.run, m.bitmap) for m in response.holders],
        response.authoritative,
    )
