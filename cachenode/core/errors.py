"""Every public exception kvpool raises, and the one table of how each travels over gRPC.

Status codes are named by their gRPC names ("UNAVAILABLE") so that core imports no grpc: the
rpc layer (`rpc/status.py`) turns a name into a `grpc.StatusCode` for servers, and a received
code back into one of these classes for clients. One table both ways keeps what a server sends
and what a client believes from drifting apart.
"""

from __future__ import annotations


class KVPoolError(Exception):
    """Base of every error kvpool raises to its callers."""


class InvalidRequest(KVPoolError):
    """The request was malformed or exceeded a limit; retrying it unchanged will fail again."""


class Unavailable(KVPoolError):
    """The pool could not be reached or did not answer in time; retrying later may work."""


class Unreachable(Unavailable):
    """A node did not answer within the timeout, or could not be reached at all: asking it again
    by another transport would only wait as long again."""


class NodeLeaving(Unavailable):
    """The node is stopping and hands its chunks over: it still serves reads, takes no puts."""


class Unauthenticated(KVPoolError):
    """The pool requires a bearer token and none, or a wrong one, was given."""


class CorruptData(KVPoolError):
    """Bytes failed verification (header or checksum); they were discarded."""


# -- the client side ---------------------------------------------------------------------------


class BadReply(Unavailable):
    """A node answered with counts or sizes that do not fit the request or its own limits."""


class Unimplemented(Unavailable):
    """The server does not offer this call (an older node, or an agent without Members)."""


class NotALookupService(Unavailable):
    """The server at the URL answers, but it is not a lookup service (e.g. a cache node)."""


class NotInThisPod(Unavailable):
    """The server is an agent, but its arena file is not reachable from this process."""


class ArenaBusy(OSError):
    """Another live agent owns the arena file."""


class NixlRequired(Unavailable):
    """transport="nixl" and NIXL could not do the request: the caller asked for no fallback.
    Not a sign that the node is down (a pool client does not mark it so)."""


class NixlFailed(KVPoolError):
    """A NIXL request did not complete; ``reason`` is a short label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NixlUnavailable(RuntimeError):
    """The nixl package is missing or its UCX backend cannot start here."""


# -- the server side ---------------------------------------------------------------------------


class RecordError(ValueError):
    """A record failed verification: wrong magic, version, key, length or checksum."""


class NoRoom(KVPoolError):
    """L1 cannot hold the values now: every range is stored and pinned, or still being read."""


class LeaseGone(KVPoolError):
    """The lease expired, was released, or its token is wrong."""


class PeerSkipped(KVPoolError):
    """Not asked: the peer failed recently and its breaker is open."""


class HolderLimit(Exception):
    """A new holder would exceed --max-holders."""


# -- status codes, by gRPC name ----------------------------------------------------------------

# What a server answers for each error; the first class that matches wins (subclasses first).
STATUS_OF_ERROR: tuple[tuple[type[BaseException], str], ...] = (
    (InvalidRequest, "INVALID_ARGUMENT"),
    (Unauthenticated, "UNAUTHENTICATED"),
    (NodeLeaving, "FAILED_PRECONDITION"),  # the caller's put goes to the next owner
    (LeaseGone, "FAILED_PRECONDITION"),
    (NoRoom, "RESOURCE_EXHAUSTED"),
    (HolderLimit, "RESOURCE_EXHAUSTED"),
    (CorruptData, "DATA_LOSS"),
    (Unimplemented, "UNIMPLEMENTED"),
    (Unavailable, "UNAVAILABLE"),
)

# What a client raises for each status it receives; any other status is an `Unavailable`.
ERROR_OF_STATUS: dict[str, type[KVPoolError]] = {
    "INVALID_ARGUMENT": InvalidRequest,
    "RESOURCE_EXHAUSTED": InvalidRequest,
    "OUT_OF_RANGE": InvalidRequest,
    "UNAUTHENTICATED": Unauthenticated,
    "UNIMPLEMENTED": Unimplemented,
    "FAILED_PRECONDITION": NodeLeaving,
    "DEADLINE_EXCEEDED": Unreachable,
    "UNAVAILABLE": Unreachable,
}


def status_name(error: BaseException) -> str:
    """The gRPC status name a server answers `error` with ("UNKNOWN" for anything unexpected)."""
    for kind, name in STATUS_OF_ERROR:
        if isinstance(error, kind):
            return name
    return "UNKNOWN"


def error_from_status(name: str | None, detail: str) -> KVPoolError:
    """The error a client raises for a call that ended with status `name` (None: no status)."""
    kind = ERROR_OF_STATUS.get(name or "")
    if kind is None:
        return Unavailable(f"{name or 'error'}: {detail}")
    if kind is Unreachable:  # the message says which: a timeout or a refused connection
        return Unreachable(f"{name}: {detail}")
    return kind(detail)
