"""The agent (`kvpool agent`): the vLLM pod's sidecar that shares KV with peer agents.

Public parts: ``AgentServer`` (server.py: a cache node whose L1 arena is a shared-memory file
the connector in the pod maps, plus the ``Agent`` gRPC service of service.py that hands out
arena offsets under leases), ``Sources`` (sources.py: on a miss, the peer agents the lookup
service names, then the cache nodes), ``PoolLink`` (pool.py: reads from and writes through to
the cache nodes), ``PeerLinks`` (peers.py: connections to peers, a breaker each) and
``arena_file`` (where the arena file lives; one owner; its memory allocated up front).

The connector in a vLLM pod imports only ``client`` (and what it needs), so nothing here is
imported eagerly: the server side needs packages the connector payload does not carry.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {"AgentServer": "server", "PeerLinks": "peers", "PoolLink": "pool", "Sources": "sources"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
