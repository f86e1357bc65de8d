"""Every kvpool setting, defined once: name, type, default, flag, `KVPOOL_*` variable, help, parser.

The registry (`SETTINGS`) is the single source that the rest builds from: `kvpool node`, `up`,
`agent` and `lookup` generate their click flags from it (cli/node_options.py), the connector reads
its extra_config keys and env vars through it, the operator names its ConfigMap keys and checks a
pool's values with these parsers (it imports this package and nothing else of cachenode), and the
settings reference in docs/settings.md is rendered from it
(`python -m kvpool.cli.devtools.settings_doc docs/settings.md`; a test keeps the file current).

Pure: parsing and checks only, no files read and no sockets. The modules, by job: `parsers`,
`setting` (one Setting), the entries (`server_entries`, `tier_entries`, `client_entries`,
`lookup_entries`), `registry` (the list and lookups over it), `shared_tiers` (the shared tiers'
configs), and the settings each program starts from: `node`, `agent`, `lookup`, `connector`.
"""

from __future__ import annotations

from kvpool.cachenode.core.record import VERSION as RECORD_FORMAT_VERSION
from kvpool.cachenode.core.settings.agent import AgentSettings, agent_settings
from kvpool.cachenode.core.settings.connector import ConnectorSettings, load_settings, loads_async
from kvpool.cachenode.core.settings.defaults import DEFAULT_GRPC_PORT, MAX_FRAME_SIZE
from kvpool.cachenode.core.settings.lookup import MAX_TOKENS_PER_KEY, LookupSettings, lookup_settings
from kvpool.cachenode.core.settings.node import NodeSettings, ServerTLSMaterial, check_node_env, node_settings
from kvpool.cachenode.core.settings.registry import (
    GROUPS,
    SETTINGS,
    SETTINGS_LIST,
    by_env,
    default,
    for_command,
    parse_env,
)
from kvpool.cachenode.core.settings.setting import AGENT, CLIENT, LOOKUP, NODE, UP, Setting
from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cachenode.core.sizes import parse_size

__all__ = [
    "AGENT",
    "CLIENT",
    "DEFAULT_GRPC_PORT",
    "GROUPS",
    "LOOKUP",
    "MAX_FRAME_SIZE",
    "MAX_TOKENS_PER_KEY",
    "NODE",
    "RECORD_FORMAT_VERSION",
    "SETTINGS",
    "SETTINGS_LIST",
    "UP",
    "AgentSettings",
    "ConnectorSettings",
    "LookupSettings",
    "NodeSettings",
    "ServerTLSMaterial",
    "Setting",
    "SharedTiersConfig",
    "agent_settings",
    "by_env",
    "check_node_env",
    "default",
    "for_command",
    "load_settings",
    "loads_async",
    "lookup_settings",
    "node_settings",
    "parse_env",
    "parse_size",
]
