"""kvpool cache node: tiered chunk storage served over gRPC and a lean TCP data channel.

Layers that point one way (docs/architecture.md): ``core`` (no I/O, no grpc) ← ``rpc`` ←
``client`` ← ``server``. ``from kvpool.cachenode import Client`` is the public entry point; it
is resolved on first use, so importing this package (for ``core``) loads no grpc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvpool.cachenode.core.errors import (
    CorruptData,
    InvalidRequest,
    KVPoolError,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from kvpool.cachenode.client.pool import Client

__all__ = ["Client", "CorruptData", "InvalidRequest", "KVPoolError", "Unauthenticated", "Unavailable"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from kvpool.cachenode.client.pool import Client

        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
