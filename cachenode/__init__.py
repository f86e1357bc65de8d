"""kvpool cache node: tiered chunk storage served over gRPC and a lean TCP data channel."""

from .client import Client
from .errors import CorruptData, InvalidRequest, KVPoolError, Unauthenticated, Unavailable

__all__ = ["Client", "CorruptData", "InvalidRequest", "KVPoolError", "Unauthenticated", "Unavailable"]
