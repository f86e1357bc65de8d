"""Settings of the lookup service; `kvpool lookup` (and later the operator) build from these."""

from __future__ import annotations

from dataclasses import dataclass

from kvpool.cachenode.rpc.tls import ServerTLS

DEFAULT_PORT = 7410
DEFAULT_HTTP_PORT = 7411
DEFAULT_HOLDER_LEASE_S = 15.0
DEFAULT_MAX_QUERY_KEYS = 8192
DEFAULT_MAX_BATCH_EVENTS = 65536
DEFAULT_MAX_SNAPSHOT_KEYS = 16 * 1024 * 1024
DEFAULT_MAX_HOLDERS = 1024
MAX_HOLDER_ID = 253  # a DNS name: pod names and node ids fit
MAX_TIER = 32
MAX_ADDRESS = 512
MAX_TOKENS_PER_KEY = 1 << 20


@dataclass
class LookupSettings:
    """Everything a lookup service needs to start; `validate()` before anything binds."""

    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    http_port: int = DEFAULT_HTTP_PORT
    holder_lease: float = DEFAULT_HOLDER_LEASE_S
    rebuild_window: float | None = None  # None = one holder lease
    max_query_keys: int = DEFAULT_MAX_QUERY_KEYS
    max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS
    max_snapshot_keys: int = DEFAULT_MAX_SNAPSHOT_KEYS
    max_holders: int = DEFAULT_MAX_HOLDERS
    auth_token: str | None = None
    tls: ServerTLS | None = None
    advertise_host: str = ""

    @property
    def effective_rebuild_window(self) -> float:
        """Every live holder heartbeats within a lease, hears of the restart and resyncs."""
        return self.holder_lease if self.rebuild_window is None else self.rebuild_window

    def validate(self) -> None:
        """Raise ValueError with a one-line message for any nonsense setting."""
        for name in ("port", "http_port"):
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
