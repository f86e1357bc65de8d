"""kvpool cache node: tiered chunk storage served over gRPC and a lean TCP data channel."""

from .errors import CorruptData, InvalidRequest, KVPoolError, Unauthenticated, Unavailable
from .transport.client import Client

__all__ = ["Client", "CorruptData", "InvalidRequest", "KVPoolError", "Unauthenticated", "Unavailable"]
