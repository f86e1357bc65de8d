"""The settings of the servers: a node's addresses and identity, pool membership, P2P (lookup
service and agent), zero-copy transfers, capacity and limits, auth and TLS, in flag order.

Those a node and an agent (and the lookup service) share are one setting each, with the command's
own default where it differs (`command_defaults`).
"""

from __future__ import annotations

from kvpool.cachenode.core.settings.defaults import (
    DEFAULT_AGENT_DATA_PORT,
    DEFAULT_AGENT_HTTP_PORT,
    DEFAULT_AGENT_PORT,
    DEFAULT_ARENA_DIR,
    DEFAULT_DATA_PORT,
    DEFAULT_EMBEDDED_MEMORY,
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_GRPC_PORT,
    DEFAULT_HANDOFF_DEADLINE_S,
    DEFAULT_HTTP_PORT,
    DEFAULT_LOOKUP_HTTP_PORT,
    DEFAULT_LOOKUP_PORT,
    DEFAULT_MAX_BATCH_KEYS,
    DEFAULT_MAX_VALUE_SIZE,
    DEFAULT_MEMORY,
    DEFAULT_NIXL_LEASE_TTL_S,
    DEFAULT_REPLICATION_FACTOR,
    MAX_NIXL_LEASE_TTL_S,
    NIXL_MODES,
)
from kvpool.cachenode.core.settings.parsers import (
    file_mode,
    grpc_url,
    integer,
    number,
    one_of,
    path,
    peers,
    pool_url,
    port,
    positive_size,
    size,
)
from kvpool.cachenode.core.settings.setting import (
    AGENT,
    AGENT_ONLY,
    CLIENT,
    LOOKUP,
    NODE,
    NODE_AND_AGENT,
    NODE_AND_CLIENT,
    SERVERS,
    Setting,
)

SERVERS_AND_LOOKUP = SERVERS | {LOOKUP}
"""Addresses and guards that the lookup service takes like a node: bind address, ports, auth, TLS."""
NODE_AGENT_AND_LOOKUP = frozenset({NODE, AGENT, LOOKUP})

SERVER_SETTINGS: tuple[Setting, ...] = (
    # -- node: addresses and identity
    Setting(
        "host",
        "0.0.0.0",
        "Address to bind every port on.",
        commands=SERVERS_AND_LOOKUP,
        readers=NODE_AGENT_AND_LOOKUP,
    ),
    Setting(
        "port",
        DEFAULT_GRPC_PORT,
        "gRPC port (0 = a free port).",
        port,
        kind="port",
        commands=SERVERS_AND_LOOKUP,
        readers=NODE_AGENT_AND_LOOKUP,
        command_defaults=((AGENT, DEFAULT_AGENT_PORT), (LOOKUP, DEFAULT_LOOKUP_PORT)),
    ),
    Setting(
        "http_port",
        DEFAULT_HTTP_PORT,
        "HTTP port for /metrics, /healthz, /readyz (the lookup service's also POST /scores, GET /stats).",
        port,
        kind="port",
        commands=SERVERS_AND_LOOKUP,
        readers=NODE_AGENT_AND_LOOKUP,
        command_defaults=((AGENT, DEFAULT_AGENT_HTTP_PORT), (LOOKUP, DEFAULT_LOOKUP_HTTP_PORT)),
    ),
    Setting(
        "data_port",
        DEFAULT_DATA_PORT,
        "TCP data channel port (0 = a free port; clients learn it over gRPC).",
        port,
        kind="port",
        commands=SERVERS,
        readers=NODE_AND_AGENT,
        command_defaults=((AGENT, DEFAULT_AGENT_DATA_PORT),),
    ),
    Setting(
        "node_id",
        "",
        "Stable node identity used for placement (in Kubernetes the pod name; "
        "default: hostname + random suffix).",
    ),
    Setting(
        "advertise_host",
        "",
        "Host that clients and peers use to reach this node, agent or lookup service "
        "(in Kubernetes the pod IP; default: the bind address).",
        commands=SERVERS_AND_LOOKUP,
        readers=NODE_AGENT_AND_LOOKUP,
    ),
    # -- pool membership
    Setting(
        "peers",
        "",
        "The other members: a comma list of node URLs or host:port, or one DNS name that "
        "resolves to every member (the headless Service). Empty: this node is a pool on its own.",
        peers,
        group="pool",
        kind="list",
    ),
    Setting(
        "replication_factor",
        DEFAULT_REPLICATION_FACTOR,
        "Nodes holding each chunk (capped at the live members); clients use the pool's value.",
        integer(1, 16),
        group="pool",
        kind="int",
        readers=NODE_AND_CLIENT,
    ),
    Setting(
        "handoff_deadline",
        DEFAULT_HANDOFF_DEADLINE_S,
        "Seconds a stopping node (SIGTERM) spends pushing its memory-tier chunks to their new owners.",
        number(0, 3600),
        group="pool",
        kind="seconds",
    ),
    # -- P2P: the lookup service and the agent
    Setting(
        "lookup_url",
        None,
        "grpc:// URL of the pool's lookup service (`kvpool lookup`): publish what this node or "
        "agent holds there; an agent also asks it which peer holds what it misses. Unset: off.",
        grpc_url,
        group="p2p",
        kind="URL",
        commands=NODE_AND_AGENT,
        readers=NODE_AND_AGENT,
    ),
    Setting(
        "pool_url",
        None,
        "The cache nodes an agent reads misses from and writes new chunks through to "
        "(a node, the pool's Service, or a comma list of nodes). Unset: the agent shares with peers only.",
        pool_url,
        group="p2p",
        kind="URL",
        commands=AGENT_ONLY,
        readers=AGENT_ONLY,
    ),
    Setting(
        "agent_id",
        "",
        "The agent's identity in the lookup service (in Kubernetes the pod name; default: the hostname).",
        group="p2p",
        commands=AGENT_ONLY,
        readers=AGENT_ONLY,
    ),
    Setting(
        "arena_dir",
        DEFAULT_ARENA_DIR,
        "Directory of the agent's shared-memory arena file, which the connector in the same pod maps "
        "(a memory-backed volume shared with the vLLM container).",
        path,
        group="p2p",
        kind="path",
        commands=AGENT_ONLY,
        readers=AGENT_ONLY,
    ),
    Setting(
        "arena_mode",
        "0660",
        "Permissions of the arena file: 0660 lets the agent's group map it (outside Kubernetes the "
        "directory is the host's /dev/shm); the webhook sets 0666 in an injected pod, whose arena "
        "volume is the pod's own, so a vLLM container running as any user can map it.",
        file_mode,
        group="p2p",
        kind="mode",
        commands=AGENT_ONLY,
        readers=AGENT_ONLY,
    ),
    Setting(
        "fetch_timeout",
        DEFAULT_FETCH_TIMEOUT_S,
        "Seconds an agent's call to the lookup service, a peer agent or the cache nodes may take.",
        number(0, 600, low_open=True),
        group="p2p",
        kind="seconds",
        commands=AGENT_ONLY,
        readers=AGENT_ONLY,
    ),
    # -- zero-copy transfers
    Setting(
        "nixl",
        "auto",
        "Serve zero-copy NIXL transfers from the L1 arena: auto = when the nixl package loads, on = "
        "refuse to start without it, off.",
        one_of(*NIXL_MODES),
        group="transport",
        kind="choice",
        commands=SERVERS,
        readers=NODE_AND_AGENT,
    ),
    Setting(
        "nixl_lease_ttl",
        DEFAULT_NIXL_LEASE_TTL_S,
        "Seconds a zero-copy lease (NIXL; an agent's shared-memory arena) keeps values in place if "
        "its client never ends it.",
        number(0, MAX_NIXL_LEASE_TTL_S, low_open=True),
        group="transport",
        kind="seconds",
        commands=SERVERS,
        readers=NODE_AND_AGENT,
    ),
    # -- memory and disk
    Setting(
        "memory",
        DEFAULT_MEMORY,
        "L1 memory budget, e.g. 512MiB, 4GiB (connector: its embedded pool's, used without a url).",
        positive_size,
        group="capacity",
        kind="size",
        commands=SERVERS,
        readers=frozenset({NODE, AGENT, CLIENT}),
        command_defaults=((CLIENT, DEFAULT_EMBEDDED_MEMORY),),
    ),
    Setting(
        "disk_dir",
        None,
        "L2 disk tier directory (created if missing; connector: its embedded pool's, which survives restarts).",
        path,
        group="capacity",
        kind="path",
        readers=NODE_AND_CLIENT,
    ),
    Setting(
        "disk_size",
        "0",
        "L2 disk budget, e.g. 100GiB (needs --disk-dir; connector: 8GiB when its disk_dir is set).",
        size,
        group="capacity",
        kind="size",
        readers=NODE_AND_CLIENT,
    ),
    Setting(
        "high_watermark",
        0.95,
        "Evict once a tier passes this fill...",
        number(0, 1, low_open=True),
        group="capacity",
        kind="number",
        commands=SERVERS,
        readers=NODE_AND_AGENT,
    ),
    Setting(
        "low_watermark",
        0.85,
        "...down to this fill.",
        number(0, 1, low_open=True),
        group="capacity",
        kind="number",
        commands=SERVERS,
        readers=NODE_AND_AGENT,
    ),
    Setting(
        "max_value_size",
        DEFAULT_MAX_VALUE_SIZE,
        "Largest value a put may carry.",
        positive_size,
        group="capacity",
        kind="size",
        commands=SERVERS,
        readers=NODE_AND_AGENT,
    ),
    Setting(
        "max_batch_keys",
        DEFAULT_MAX_BATCH_KEYS,
        "Most keys in one request (the client splits larger batches).",
        integer(1, 1_000_000),
        group="capacity",
        kind="int",
        commands=SERVERS,
        readers=NODE_AND_AGENT,
    ),
    # -- security
    Setting(
        "auth_token_file",
        None,
        "Require the bearer token in this file on every call except health (clients: send it).",
        path,
        group="security",
        kind="path",
        readers=frozenset({NODE, AGENT, LOOKUP, CLIENT}),
        commands=SERVERS_AND_LOOKUP,
    ),
    Setting(
        "tls_cert_file",
        None,
        "Serve TLS on every port with this certificate chain (PEM).",
        path,
        group="security",
        kind="path",
        commands=SERVERS_AND_LOOKUP,
        readers=NODE_AGENT_AND_LOOKUP,
    ),
    Setting(
        "tls_key_file",
        None,
        "The private key of --tls-cert-file (PEM).",
        path,
        group="security",
        kind="path",
        commands=SERVERS_AND_LOOKUP,
        readers=NODE_AGENT_AND_LOOKUP,
    ),
)
