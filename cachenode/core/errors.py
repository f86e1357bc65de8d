"""The client-facing exception hierarchy; servers map these to gRPC status codes."""

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
