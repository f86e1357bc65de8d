"""`LookupClient`: ask a lookup service who holds a key list's prefix, or for routing scores."""

from __future__ import annotations

import json
from collections.abc import Sequence

import grpc

from kvpool.cachenode.core.errors import NotALookupService, Unimplemented
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.core.located import HolderMatch, Located, Score
from kvpool.cachenode.rpc import lookup_wire as wire
from kvpool.cachenode.rpc.channels import bearer_metadata, open_url
from kvpool.cachenode.rpc.proto import lookup_pb2 as pb
from kvpool.cachenode.rpc.proto import lookup_pb2_grpc as pb_grpc
from kvpool.cachenode.rpc.status import translate

DEFAULT_TIMEOUT_S = 5.0
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
    """Thread-safe; reuse one per process. Errors raise kvpool's KVPoolError subclasses."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        tls_ca_file: str | None = None,
    ) -> None:
        self.url = url
        self._timeout = timeout
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(url, tls_ca_file)
        self._stub = pb_grpc.LookupStub(self._channel)

    def __enter__(self) -> LookupClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def locate(self, keys: Sequence[bytes]) -> Located:
        """The longest prefix of `keys` held somewhere, with its holders (`holders_of(result, j)`)."""
        response = self._call(self._stub.Locate, pb.LookupLocateRequest(keys=wire.pack_ordered(keys)))
        return Located(
            response.prefix,
            [HolderMatch(holder_info(m.holder), m.run, m.bitmap) for m in response.holders],
            response.authoritative,
        )

    def scores(self, keys: Sequence[bytes], tokens_per_key: int, kind: str = "") -> tuple[list[Score], bool]:
        """Per-holder matched tokens, best first, and whether the index was complete (authoritative)."""
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

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            error = translate(exc)
        if isinstance(error, Unimplemented):
            raise NotALookupService(f"{self.url} does not serve kvpool.v1.Lookup") from None
        raise error from None
