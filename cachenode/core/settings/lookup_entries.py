"""The lookup service's own settings (`kvpool lookup`); its bind address, ports, auth and TLS are
the node's settings with the lookup's defaults (server_entries.py)."""

from __future__ import annotations

from typing import Any

from kvpool.cachenode.core.settings.defaults import (
    DEFAULT_HOLDER_LEASE_S,
    DEFAULT_MAX_BATCH_EVENTS,
    DEFAULT_MAX_HOLDERS,
    DEFAULT_MAX_QUERY_KEYS,
    DEFAULT_MAX_SNAPSHOT_KEYS,
)
from kvpool.cachenode.core.settings.parsers import integer, number, port
from kvpool.cachenode.core.settings.setting import LOOKUP_ONLY, Setting

_LOOKUP: dict[str, Any] = {"group": "lookup", "commands": LOOKUP_ONLY, "readers": LOOKUP_ONLY}

LOOKUP_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "query_port",
        0,
        "Port of the lean query channel (Locate/Scores over TCP, pipelined; 0 = a free port; "
        "clients learn it with a gRPC Hello and fall back to gRPC when it is unreachable).",
        port,
        kind="port",
        **_LOOKUP,
    ),
    Setting(
        "holder_lease",
        DEFAULT_HOLDER_LEASE_S,
        "Seconds a holder keeps its entries without a heartbeat or batch (holders heartbeat at a third).",
        number(0.5, 3600),
        kind="seconds",
        **_LOOKUP,
    ),
    Setting(
        "rebuild_window",
        None,
        "Seconds after start before answers are authoritative and /readyz passes (default: the lease).",
        number(0, 3600),
        kind="seconds",
        **_LOOKUP,
    ),
    Setting(
        "max_query_keys",
        DEFAULT_MAX_QUERY_KEYS,
        "Most keys in one Locate/Scores query.",
        integer(1, 1_000_000),
        kind="int",
        **_LOOKUP,
    ),
    Setting(
        "max_batch_events",
        DEFAULT_MAX_BATCH_EVENTS,
        "Most events in one published batch.",
        integer(1, 1_000_000),
        kind="int",
        **_LOOKUP,
    ),
    Setting(
        "max_snapshot_keys",
        DEFAULT_MAX_SNAPSHOT_KEYS,
        "Most keys in one holder's snapshot (resync).",
        integer(1, 1 << 30),
        kind="int",
        **_LOOKUP,
    ),
    Setting(
        "max_holders",
        DEFAULT_MAX_HOLDERS,
        "Most holders (agents and nodes) at once; every 64 add 8 bytes to each slot of the index.",
        integer(1, 65536),
        kind="int",
        **_LOOKUP,
    ),
)
