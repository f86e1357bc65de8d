"""What `kvpool agent` starts from: `AgentSettings`, built and checked by `agent_settings()`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpool.cachenode.core.settings.defaults import DEFAULT_ARENA_DIR
from kvpool.cachenode.core.settings.node import NodeSettings, ServerTLSMaterial
from kvpool.cachenode.core.settings.registry import default, for_command
from kvpool.cachenode.core.settings.setting import AGENT


@dataclass
class AgentSettings:
    """What `kvpool agent` starts from. `node()` is the part it serves exactly as a node does (its
    API to peers and to connectors outside the pod); the rest is the agent's own."""

    host: str = default("host")
    port: int = default("port", AGENT)
    http_port: int = default("http_port", AGENT)
    data_port: int = default("data_port", AGENT)
    memory: int = default("memory")
    max_value_size: int = default("max_value_size")
    max_batch_keys: int = default("max_batch_keys")
    high_watermark: float = default("high_watermark")
    low_watermark: float = default("low_watermark")
    advertise_host: str = default("advertise_host")
    nixl: str = default("nixl")
    nixl_lease_ttl: float = default("nixl_lease_ttl")
    agent_id: str = default("agent_id")
    lookup_url: str | None = None
    pool_url: str | None = None
    arena_dir: Path = field(default_factory=lambda: Path(DEFAULT_ARENA_DIR))
    arena_mode: int = 0o660
    fetch_timeout: float = default("fetch_timeout")
    tier_queue_items: int = default("tier_queue_items")
    tier_queue_size: int = default("tier_queue_size")
    tls_ca_file: Path | None = None
    auth_token: str | None = None
    tls: ServerTLSMaterial | None = None

    def node(self) -> NodeSettings:
        """The node part: no disk, no shared tiers, no pool membership, nothing to hand over."""
        return NodeSettings(
            host=self.host, port=self.port, http_port=self.http_port, data_port=self.data_port,
            memory=self.memory, max_value_size=self.max_value_size, max_batch_keys=self.max_batch_keys,
            auth_token=self.auth_token, tls=self.tls, node_id=self.agent_id,
            advertise_host=self.advertise_host, high_watermark=self.high_watermark,
            low_watermark=self.low_watermark, handoff_deadline=0.0, nixl=self.nixl,
            nixl_lease_ttl=self.nixl_lease_ttl,
        )  # fmt: skip

    def validate(self) -> None:
        self.node().validate()
        if not self.agent_id.strip():
            raise ValueError("--agent-id must not be empty")
        if len(self.agent_id) > 253:
            raise ValueError(f"--agent-id must be at most 253 characters, got {len(self.agent_id)}")


_AGENT_FIELDS = (
    "host", "port", "http_port", "data_port", "memory", "max_value_size", "max_batch_keys",
    "high_watermark", "low_watermark", "advertise_host", "nixl", "nixl_lease_ttl", "agent_id",
    "lookup_url", "pool_url", "arena_dir", "arena_mode", "fetch_timeout", "tier_queue_items", "tier_queue_size",
    "tls_ca_file",
)  # fmt: skip


def agent_settings(
    values: Mapping[str, Any],
    *,
    hostname: str,
    auth_token: str | None = None,
    tls: ServerTLSMaterial | None = None,
) -> AgentSettings:
    """A validated AgentSettings from parsed values (missing → the agent's defaults); an empty
    agent id becomes `hostname`. Pure, like node_settings."""
    full = {s.name: s.value(s.default_for(AGENT)) for s in for_command(AGENT)} | dict(values)
    if not full.get("agent_id"):
        full["agent_id"] = hostname
    settings = AgentSettings(**{name: full[name] for name in _AGENT_FIELDS}, auth_token=auth_token, tls=tls)
    settings.validate()
    return settings
