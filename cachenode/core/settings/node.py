"""What a node starts from: `NodeSettings`, built and checked from parsed values by `node_settings()`.

Pure: the token and TLS material are read by the caller (the CLI), so a setting here never touches
a file; `check_node_env` lets the operator refuse an environment a node would refuse.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kvpool.cachenode.core.settings.registry import by_env, default, for_command, parse_env
from kvpool.cachenode.core.settings.setting import NODE
from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig


class ServerTLSMaterial(Protocol):
    """A server's certificate and key as its ports use them (rpc/tls.py's `ServerTLS`, which
    follows renewed files): settings carry it without importing the loader."""

    @property
    def context(self) -> ssl.SSLContext:
        """The SSLContext for the next server-side handshake (HTTP, data channel)."""
        ...

    def current(self) -> tuple[int, bytes, bytes]:
        """(generation, key PEM, certificate PEM) for the next handshake (gRPC's credentials)."""
        ...


@dataclass
class NodeSettings:
    """Everything a node needs to start; validated by `validate()` before anything binds."""

    host: str = default("host")
    port: int = default("port")
    http_port: int = default("http_port")
    data_port: int = default("data_port")
    memory: int = default("memory")
    disk_dir: Path | None = None
    disk_size: int = default("disk_size")
    max_value_size: int = default("max_value_size")
    max_batch_keys: int = default("max_batch_keys")
    auth_token: str | None = None
    tls: ServerTLSMaterial | None = None
    node_id: str = default("node_id")
    advertise_host: str = default("advertise_host")
    high_watermark: float = default("high_watermark")
    low_watermark: float = default("low_watermark")
    shared: SharedTiersConfig | None = None
    peers: str = default("peers")
    replication_factor: int = default("replication_factor")
    handoff_deadline: float = default("handoff_deadline")
    nixl: str = default("nixl")
    nixl_lease_ttl: float = default("nixl_lease_ttl")
    lookup_url: str | None = None
    """Publish this node's chunks to the lookup service there (a holder of kind "node")."""

    def validate(self) -> None:
        """Raise ValueError with a one-line message for any nonsense setting."""
        for name in ("port", "http_port", "data_port"):
            value = getattr(self, name)
            if not 0 <= value <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be 0..65535, got {value}")
        if self.memory <= 0:
            raise ValueError("--memory must be positive")
        if self.max_value_size <= 0:
            raise ValueError("--max-value-size must be positive")
        if not 1 <= self.max_batch_keys <= 1_000_000:
            raise ValueError(f"--max-batch-keys must be 1..1000000, got {self.max_batch_keys}")
        if self.disk_dir is not None and self.disk_size <= 0:
            raise ValueError("--disk-dir needs a positive --disk-size")
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise ValueError(
                f"watermarks must satisfy 0 < --low-watermark < --high-watermark <= 1, "
                f"got {self.low_watermark} and {self.high_watermark}"
            )
        if self.disk_dir is None and self.disk_size:
            raise ValueError("--disk-size needs --disk-dir")
        if self.replication_factor < 1:
            raise ValueError(f"--replication-factor must be at least 1, got {self.replication_factor}")
        if not 0 <= self.handoff_deadline <= 3600:
            raise ValueError(f"--handoff-deadline must be 0..3600 seconds, got {self.handoff_deadline}")


_NODE_FIELDS = (
    "host", "port", "http_port", "data_port", "memory", "disk_dir", "disk_size", "max_value_size",
    "max_batch_keys", "node_id", "advertise_host", "high_watermark", "low_watermark", "peers",
    "replication_factor", "handoff_deadline", "nixl", "nixl_lease_ttl", "lookup_url",
)  # fmt: skip


def node_settings(
    values: Mapping[str, Any], *, auth_token: str | None = None, tls: ServerTLSMaterial | None = None
) -> NodeSettings:
    """A validated NodeSettings from parsed values (names as in the registry; missing → default).

    Pure: the token and TLS material are read by the caller (the CLI); ValueError says what is wrong.
    """
    full = {s.name: s.default_value for s in for_command(NODE)} | dict(values)
    shared = SharedTiersConfig.from_options(**full)
    settings = NodeSettings(
        **{name: full[name] for name in _NODE_FIELDS}, auth_token=auth_token, tls=tls, shared=shared
    )
    settings.validate()
    return settings


def check_node_env(env: Mapping[str, str]) -> None:
    """Raise ValueError if `kvpool node` would refuse this environment (or it holds an unknown
    `KVPOOL_*` name). Files named by the settings are not read: the caller cannot see them."""
    unknown = sorted(name for name in env if name.startswith("KVPOOL_") and by_env(name) is None)
    if unknown:
        raise ValueError(f"no kvpool setting reads {', '.join(unknown)}")
    node_settings(parse_env(env))
