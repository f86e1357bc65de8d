"""The registry: every setting by name, in flag and docs order, and lookups over it.

The entries live by job (server_entries, tier_entries, client_entries, lookup_entries); this is
the one list they join, so a name and an env var are each defined once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvpool.cachenode.core.settings.client_entries import CLIENT_SETTINGS
from kvpool.cachenode.core.settings.lookup_entries import LOOKUP_SETTINGS
from kvpool.cachenode.core.settings.server_entries import SERVER_SETTINGS
from kvpool.cachenode.core.settings.setting import NODE, Setting
from kvpool.cachenode.core.settings.tier_entries import TIER_SETTINGS

SETTINGS_LIST: tuple[Setting, ...] = SERVER_SETTINGS + TIER_SETTINGS + CLIENT_SETTINGS + LOOKUP_SETTINGS

SETTINGS: dict[str, Setting] = {s.name: s for s in SETTINGS_LIST}

GROUPS: dict[str, str] = {
    "node": "Node: addresses and identity",
    "pool": "Pool membership",
    "capacity": "Memory, disk and limits",
    "security": "Auth and TLS",
    "p2p": "P2P: lookup service and agent",
    "lookup": "Lookup service (`kvpool lookup`)",
    "transport": "Zero-copy transfers (NIXL)",
    "tiers": "Shared tiers (Redis/Valkey, S3)",
    "policy": "Shared-tier policy",
    "client": "Clients (engine pods, `kvpool status`)",
    "connector": "Connector (vLLM's kv_connector_extra_config, else the env var)",
}
"""Each group's title in docs/settings.md, in the order the tables appear."""


def by_env(name: str) -> Setting | None:
    """The setting whose env var is `name`, if any."""
    if not name.startswith("KVPOOL_"):
        return None
    return SETTINGS.get(name[len("KVPOOL_") :].lower())


def for_command(command: str) -> list[Setting]:
    """The settings that are flags of `command`, in registry order."""
    return [s for s in SETTINGS_LIST if command in s.commands]


def default(name: str, command: str | None = None) -> Any:
    """The parsed default of `name` for `command` (or a reader such as CLIENT)."""
    setting = SETTINGS[name]
    return setting.value(setting.default_for(command))


def parse_env(env: Mapping[str, str], command: str = NODE) -> dict[str, Any]:
    """The values of `command`'s settings from env vars (`KVPOOL_*`), parsed; unset ones are left out."""
    out: dict[str, Any] = {}
    for s in for_command(command):
        raw = env.get(s.env)
        if raw is None:
            continue
        try:
            out[s.name] = s.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{s.env}={raw!r}: {exc}") from None
    return out
