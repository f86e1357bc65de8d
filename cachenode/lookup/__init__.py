"""The P2P lookup service: which agent or cache node holds which chunk.

Public parts: ``LookupServer`` and ``LookupSettings`` (what `kvpool lookup` runs), ``LookupClient``
(Locate / Scores / Stats for connectors, agents and routers; ``holders_of`` decodes who holds key j),
``Publisher`` with ``HolderInfo`` (the holder side: agents and nodes publish admit/evict events),
and the pure parts behind them: ``index`` (holders, leases, sequence numbers, queries), ``table``
(the compact fingerprint → holder-bitmask table) and ``fingerprint``.

Nothing is imported eagerly: a connector in a vLLM pod imports ``client`` alone, and the server
side needs packages the connector payload does not carry.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "HolderInfo": "holders",
    "Located": "index",
    "LookupClient": "client",
    "LookupIndex": "index",
    "LookupServer": "server",
    "LookupSettings": "settings",
    "Publisher": "publisher",
    "Score": "index",
    "holders_of": "client",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
