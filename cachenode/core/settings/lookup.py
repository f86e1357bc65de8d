"""What the lookup service starts from: `LookupSettings`, built and checked by `lookup_settings()`
(`kvpool lookup`), or made in code (`kvpool up` runs one in-process)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvpool.cachenode.core.settings.node import ServerTLSMaterial
from kvpool.cachenode.core.settings.registry import default, for_command
from kvpool.cachenode.core.settings.setting import LOOKUP

MAX_TOKENS_PER_KEY = 1 << 20
"""Largest chunk size (tokens per key) a Scores query may name."""


@dataclass
class LookupSettings:
    """Everything a lookup service needs to start; `validate()` before anything binds."""

    host: str = default("host", LOOKUP)
    port: int = default("port", LOOKUP)
    http_port: int = default("http_port", LOOKUP)
    query_port: int = default("query_port", LOOKUP)
    holder_lease: float = default("holder_lease")
    rebuild_window: float | None = None  # None = one holder lease
    max_query_keys: int = default("max_query_keys")
    max_batch_events: int = default("max_batch_events")
    max_snapshot_keys: int = default("max_snapshot_keys")
    max_holders: int = default("max_holders")
    auth_token: str | None = None
    tls: ServerTLSMaterial | None = None
    advertise_host: str = default("advertise_host", LOOKUP)

    @property
    def effective_rebuild_window(self) -> float:
        """Every live holder heartbeats within a lease, hears of the restart and resyncs."""
        return self.holder_lease if self.rebuild_window is None else self.rebuild_window

    def validate(self) -> None:
        """Raise ValueError with a one-line message for any nonsense setting."""
        for name in ("port", "http_port", "query_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be 0..65535, got {value}")
        if not 0.5 <= self.holder_lease <= 3600:
            raise ValueError(f"--holder-lease must be 0.5..3600 seconds, got {self.holder_lease}")
        if self.rebuild_window is not None and not 0 <= self.rebuild_window <= 3600:
            raise ValueError(f"--rebuild-window must be 0..3600 seconds, got {self.rebuild_window}")
        for name, top in (("max_query_keys", 1_000_000), ("max_batch_events", 1_000_000)):
            value = getattr(self, name)
            if not 1 <= value <= top:
                raise ValueError(f"--{name.replace('_', '-')} must be 1..{top}, got {value}")
        if not 1 <= self.max_holders <= 65536:
            raise ValueError(f"--max-holders must be 1..65536, got {self.max_holders}")
        if not 1 <= self.max_snapshot_keys <= 1 << 30:
            raise ValueError(f"--max-snapshot-keys must be 1..{1 << 30}, got {self.max_snapshot_keys}")


_LOOKUP_FIELDS = (
    "host", "port", "http_port", "query_port", "holder_lease", "rebuild_window", "max_query_keys", "max_batch_events",
    "max_snapshot_keys", "max_holders", "advertise_host",
)  # fmt: skip


def lookup_settings(
    values: Mapping[str, Any], *, auth_token: str | None = None, tls: ServerTLSMaterial | None = None
) -> LookupSettings:
    """A validated LookupSettings from parsed values (missing → the lookup's defaults). Pure, like
    node_settings."""
    full = {s.name: s.value(s.default_for(LOOKUP)) for s in for_command(LOOKUP)} | dict(values)
    settings = LookupSettings(**{name: full[name] for name in _LOOKUP_FIELDS}, auth_token=auth_token, tls=tls)
    settings.validate()
    return settings
