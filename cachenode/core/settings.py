"""Every kvpool setting, defined once: name, type, default, flag, `KVPOOL_*` variable, help, parser.

The registry (`SETTINGS`) is the single source that the rest builds from: `kvpool node` and
`kvpool up` generate their click flags from it (cli/node_options.py), the operator names its
ConfigMap keys and checks a pool's values with these parsers (it imports this module and nothing
else of cachenode), and the settings reference in docs/settings.md is rendered from it
(`python -m kvpool.cli.devtools.settings_doc docs/settings.md`; a test keeps the file current).

Pure: parsing and checks only, no files read and no sockets. `NodeSettings` is what a node starts
from; `node_settings()` builds and validates one from parsed values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.record import VERSION as RECORD_FORMAT_VERSION
from kvpool.cachenode.core.sizes import parse_size
from kvpool.cachenode.core.urls import parse_peers, parse_url, parse_urls
from kvpool.cachenode.rpc.tls import ServerTLS
from kvpool.cachenode.server.tiers import shared_config as tiers
from kvpool.cachenode.server.tiers.shared_config import SharedTiersConfig

__all__ = [
    "RECORD_FORMAT_VERSION",
    "SETTINGS",
    "AgentSettings",
    "NodeSettings",
    "Setting",
    "agent_settings",
    "by_env",
    "check_node_env",
    "node_settings",
    "parse_env",
    "parse_size",
]

DEFAULT_GRPC_PORT = 7400
DEFAULT_HTTP_PORT = 7401
DEFAULT_DATA_PORT = 7402
DEFAULT_MEMORY = "4GiB"
DEFAULT_MAX_VALUE_SIZE = "256MiB"
DEFAULT_MAX_BATCH_KEYS = 4096
DEFAULT_REPLICATION_FACTOR = 1
DEFAULT_HANDOFF_DEADLINE_S = 30.0
MAX_FRAME_SIZE = 4 * 1024 * 1024
NIXL_MODES = ("auto", "on", "off")
DEFAULT_NIXL_LEASE_TTL_S = 30.0
MAX_NIXL_LEASE_TTL_S = 600.0  # leases.MAX_TTL_S
DEFAULT_AGENT_PORT = 7420
DEFAULT_AGENT_HTTP_PORT = 7421
DEFAULT_AGENT_DATA_PORT = 7422
DEFAULT_ARENA_DIR = "/dev/shm"
DEFAULT_FETCH_TIMEOUT_S = 5.0

NODE, UP, AGENT = "node", "up", "agent"
"""Commands whose flags a setting is (`commands`)."""
CLIENT = "client"
"""Reader of settings that pods of an engine get (`readers`): the connector or `Client`."""


# -- parsers: text (a flag or an env value) → value; ValueError says what is wrong -----------------


def text(value: Any) -> str:
    return str(value)


def path(value: Any) -> Path:
    if not str(value).strip():
        raise ValueError("must not be empty")
    return Path(value)


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (true or false)")


def integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            n = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if isinstance(n, bool) or not low <= n <= high:
            raise ValueError(f"must be between {low} and {high}, got {value!r}")
        return n

    return parse


def number(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if not (low < x if low_open else low <= x) or x > high:
            bound = f"above {low}" if low_open else f"at least {low}"
            raise ValueError(f"must be {bound} and at most {high}, got {value!r}")
        return x

    return parse


def size(value: Any) -> int:
    return parse_size(value)


def positive_size(value: Any) -> int:
    n = parse_size(value)
    if n <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return n


port = integer(0, 65535)


def file_mode(value: Any) -> int:
    """An octal permission mode that keeps the owner's read and write and grants no execute."""
    try:
        mode = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip(), 8)
    except ValueError:
        raise ValueError(f"{value!r} is not an octal file mode such as 0660") from None
    if mode & ~0o666 or mode & 0o600 != 0o600:
        raise ValueError(
            f"must give the owner read and write and nobody execute (0600 to 0666), got {value!r}"
        )
    return mode


def peers(value: Any) -> str:
    """A comma list of node URLs or host:port, or one DNS name (parsed as the node parses it)."""
    spec = str(value).strip()
    try:
        parse_peers(spec, DEFAULT_GRPC_PORT)
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from None
    return spec


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        word = str(value).strip().lower()
        if word not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return word

    return parse


def grpc_url(value: Any) -> str:
    """One grpc:// or grpcs:// URL (the lookup service)."""
    try:
        parse_url(str(value))
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from None
    return str(value).strip()


def pool_url(value: Any) -> str:
    """A pool: one URL, or a comma list of node URLs (all grpc:// or all grpcs://)."""
    try:
        parse_urls(str(value))
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from None
    return str(value).strip()


def checked(parse: Callable[[Any], object]) -> Callable[[Any], str]:
    """A parser that checks text with a node parser and keeps the text (URLs, names, lists)."""

    def check(value: Any) -> str:
        parse(value)
        return str(value)

    return check


# -- the registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting. `default` is written as a user would type it; `parse` turns such text into the
    value (and raises ValueError for anything the node refuses)."""

    name: str
    default: Any
    help: str
    parse: Callable[[Any], Any] = text
    group: str = "node"
    kind: str = "text"
    """What the value is, for --help and the docs: text, size, int, number, port, path, bool, list, URL, mode."""
    commands: frozenset[str] = frozenset({NODE, UP})
    readers: frozenset[str] = frozenset({NODE})
    secret: bool = False
    """Never shown, never put in a ConfigMap (a Secret carries it)."""
    negatable: bool = False
    """A boolean with `--x/--no-x` flags."""
    flag_name: str | None = None
    """The flag when it is not `--<name>` with dashes (settings read only by clients)."""
    command_defaults: tuple[tuple[str, Any], ...] = field(default=())
    """(command, default) where a command's default differs from `default` (the agent's ports)."""

    def default_for(self, command: str | None) -> Any:
        """The default as a user would type it, for `command`'s flag."""
        return dict(self.command_defaults).get(command, self.default)

    @property
    def flag(self) -> str:
        """`--<name>`; empty for a setting that has no flag of its own (read from env or extra_config)."""
        return self.flag_name if self.flag_name is not None else "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "KVPOOL_" + self.name.upper()

    def value(self, raw: Any) -> Any:
        """The parsed value of `raw` (None stays None: the setting is unset)."""
        return None if raw is None else self.parse(raw)

    @property
    def default_value(self) -> Any:
        return self.value(self.default)

    def text(self, value: Any) -> str:
        """A value as the text of its env var (what a ConfigMap holds)."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list | tuple):
            return ",".join(map(str, value))
        if self.kind == "mode" and isinstance(value, int):
            return f"{value:04o}"
        return str(value)


_NODE_AND_CLIENT = frozenset({NODE, CLIENT})
_CLIENT_ONLY = frozenset({CLIENT})
_SERVERS = frozenset({NODE, UP, AGENT})
"""Settings that mean the same for a node and an agent (which serves the node's API to its peers)."""
_NODE_AND_AGENT = frozenset({NODE, AGENT})
_AGENT_ONLY = frozenset({AGENT})

SETTINGS_LIST: tuple[Setting, ...] = (
    # -- node: addresses and identity
    Setting("host", "0.0.0.0", "Address to bind every port on.", commands=_SERVERS, readers=_NODE_AND_AGENT),
    Setting(
        "port",
        DEFAULT_GRPC_PORT,
        "gRPC port (0 = a free port).",
        port,
        kind="port",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
        command_defaults=((AGENT, DEFAULT_AGENT_PORT),),
    ),
    Setting(
        "http_port",
        DEFAULT_HTTP_PORT,
        "HTTP port for /metrics, /healthz, /readyz.",
        port,
        kind="port",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
        command_defaults=((AGENT, DEFAULT_AGENT_HTTP_PORT),),
    ),
    Setting(
        "data_port",
        DEFAULT_DATA_PORT,
        "TCP data channel port (0 = a free port; clients learn it over gRPC).",
        port,
        kind="port",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
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
        "Host that clients and peers use to reach this node or agent "
        "(in Kubernetes the pod IP; default: the bind address).",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
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
        readers=_NODE_AND_CLIENT,
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
        commands=_NODE_AND_AGENT,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "pool_url",
        None,
        "The cache nodes an agent reads misses from and writes new chunks through to "
        "(a node, the pool's Service, or a comma list of nodes). Unset: the agent shares with peers only.",
        pool_url,
        group="p2p",
        kind="URL",
        commands=_AGENT_ONLY,
        readers=_AGENT_ONLY,
    ),
    Setting(
        "agent_id",
        "",
        "The agent's identity in the lookup service (in Kubernetes the pod name; default: the hostname).",
        group="p2p",
        commands=_AGENT_ONLY,
        readers=_AGENT_ONLY,
    ),
    Setting(
        "arena_dir",
        DEFAULT_ARENA_DIR,
        "Directory of the agent's shared-memory arena file, which the connector in the same pod maps "
        "(a memory-backed volume shared with the vLLM container).",
        path,
        group="p2p",
        kind="path",
        commands=_AGENT_ONLY,
        readers=_AGENT_ONLY,
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
        commands=_AGENT_ONLY,
        readers=_AGENT_ONLY,
    ),
    Setting(
        "fetch_timeout",
        DEFAULT_FETCH_TIMEOUT_S,
        "Seconds an agent's call to the lookup service, a peer agent or the cache nodes may take.",
        number(0, 600, low_open=True),
        group="p2p",
        kind="seconds",
        commands=_AGENT_ONLY,
        readers=_AGENT_ONLY,
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
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "nixl_lease_ttl",
        DEFAULT_NIXL_LEASE_TTL_S,
        "Seconds a zero-copy lease (NIXL; an agent's shared-memory arena) keeps values in place if "
        "its client never ends it.",
        number(0, MAX_NIXL_LEASE_TTL_S, low_open=True),
        group="transport",
        kind="seconds",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    # -- memory and disk
    Setting(
        "memory",
        DEFAULT_MEMORY,
        "L1 memory budget, e.g. 512MiB, 4GiB.",
        positive_size,
        group="capacity",
        kind="size",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "disk_dir", None, "L2 disk tier directory (created if missing).", path, group="capacity", kind="path"
    ),
    Setting(
        "disk_size",
        "0",
        "L2 disk budget, e.g. 100GiB (needs --disk-dir).",
        size,
        group="capacity",
        kind="size",
    ),
    Setting(
        "high_watermark",
        0.95,
        "Evict once a tier passes this fill...",
        number(0, 1, low_open=True),
        group="capacity",
        kind="number",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "low_watermark",
        0.85,
        "...down to this fill.",
        number(0, 1, low_open=True),
        group="capacity",
        kind="number",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "max_value_size",
        DEFAULT_MAX_VALUE_SIZE,
        "Largest value a put may carry.",
        positive_size,
        group="capacity",
        kind="size",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "max_batch_keys",
        DEFAULT_MAX_BATCH_KEYS,
        "Most keys in one request (the client splits larger batches).",
        integer(1, 1_000_000),
        group="capacity",
        kind="int",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    # -- security
    Setting(
        "auth_token_file",
        None,
        "Require the bearer token in this file on every call except health (clients: send it).",
        path,
        group="security",
        kind="path",
        readers=frozenset({NODE, AGENT, CLIENT}),
        commands=_SERVERS,
    ),
    Setting(
        "tls_cert_file",
        None,
        "Serve TLS on every port with this certificate chain (PEM).",
        path,
        group="security",
        kind="path",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "tls_key_file",
        None,
        "The private key of --tls-cert-file (PEM).",
        path,
        group="security",
        kind="path",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    # -- shared tiers
    Setting(
        "pool_name",
        "default",
        "Pool name: the shared tiers' key prefix (tenants of different pools never meet).",
        checked(tiers.parse_pool_name),
        group="tiers",
    ),
    Setting(
        "redis_url",
        None,
        "redis://, rediss:// (TLS), valkey:// or valkeys:// URL of the shared tier: "
        "user:password@, /db, TLS options ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs in the query.",
        checked(tiers.parse_redis_url),
        group="tiers",
        kind="URL",
    ),
    Setting("redis_username", None, "Redis ACL user (overrides the URL's).", group="tiers", secret=True),
    Setting(
        "redis_password",
        None,
        "Redis password (overrides the URL's; set it from a Secret).",
        group="tiers",
        secret=True,
    ),
    Setting("redis_prefix", None, "Key prefix in Redis (default kvpool:<pool>:).", group="tiers"),
    Setting(
        "redis_ttl",
        None,
        "TTL of chunks in Redis (e.g. 3600, 90s, 15m, 2h, 7d; 0 = none).",
        tiers.VALUE_CHECKS["redis_ttl"],
        group="tiers",
        kind="seconds",
    ),
    Setting(
        "redis_part_size",
        "8MiB",
        "Chunks above this are split into parts fetched in parallel (at most 8MiB).",
        tiers.VALUE_CHECKS["redis_part_size"],
        group="tiers",
        kind="size",
    ),
    Setting(
        "redis_timeout",
        1.0,
        "Redis socket timeout, seconds.",
        tiers.VALUE_CHECKS["redis_timeout"],
        group="tiers",
        kind="seconds",
    ),
    Setting(
        "redis_connections",
        8,
        "Redis connection pool size.",
        tiers.VALUE_CHECKS["redis_connections"],
        group="tiers",
        kind="int",
    ),
    Setting(
        "s3_url",
        None,
        "s3://bucket/prefix of the durable tier (one object per chunk; default prefix kvpool/<pool>).",
        checked(tiers.parse_s3_url),
        group="tiers",
        kind="URL",
    ),
    Setting(
        "s3_endpoint",
        None,
        "Any S3-compatible endpoint, http(s)://host:port (default: AWS).",
        tiers.VALUE_CHECKS["s3_endpoint"],
        group="tiers",
        kind="URL",
    ),
    Setting("s3_region", None, "S3 region (default from the AWS configuration).", group="tiers"),
    Setting(
        "s3_path_style",
        None,
        "Path-style addressing (default: on with --s3-endpoint).",
        boolean,
        group="tiers",
        kind="bool",
        negatable=True,
    ),
    Setting(
        "s3_multipart_threshold",
        "16MiB",
        "Multipart upload above this size.",
        tiers.VALUE_CHECKS["s3_multipart_threshold"],
        group="tiers",
        kind="size",
    ),
    Setting(
        "s3_part_size",
        "8MiB",
        "Multipart part size (at least 5MiB).",
        tiers.VALUE_CHECKS["s3_part_size"],
        group="tiers",
        kind="size",
    ),
    Setting(
        "s3_read_part_size",
        "8MiB",
        "Ranged parallel reads of this size, pinned to the object's ETag (0: one GET per object).",
        tiers.VALUE_CHECKS["s3_read_part_size"],
        group="tiers",
        kind="size",
    ),
    Setting(
        "s3_concurrency",
        8,
        "Parallel S3 transfers.",
        tiers.VALUE_CHECKS["s3_concurrency"],
        group="tiers",
        kind="int",
    ),
    Setting(
        "s3_timeout",
        5.0,
        "S3 read timeout, seconds.",
        tiers.VALUE_CHECKS["s3_timeout"],
        group="tiers",
        kind="seconds",
    ),
    # -- tier policy
    Setting(
        "tier_order",
        "redis,s3",
        "Order in which shared tiers are read.",
        checked(tiers.parse_tier_order),
        group="policy",
        kind="list",
    ),
    Setting(
        "tier_write",
        "through",
        "through: every put is queued for the shared tiers; back: written when "
        "evicted from the last local tier.",
        checked(tiers.parse_write_mode),
        group="policy",
    ),
    Setting(
        "tier_promote",
        True,
        "Promote shared-tier hits into L1/L2.",
        boolean,
        group="policy",
        kind="bool",
        negatable=True,
    ),
    Setting(
        "tier_queue_items",
        1024,
        "Background write queue, records (an agent's: its write-through to the cache nodes).",
        tiers.VALUE_CHECKS["tier_queue_items"],
        group="policy",
        kind="int",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "tier_queue_size",
        "512MiB",
        "Background write queue, bytes (an agent's: its write-through to the cache nodes).",
        tiers.VALUE_CHECKS["tier_queue_size"],
        group="policy",
        kind="size",
        commands=_SERVERS,
        readers=_NODE_AND_AGENT,
    ),
    Setting(
        "tier_breaker_failures",
        3,
        "Failures in a row that open a tier's circuit breaker.",
        tiers.VALUE_CHECKS["tier_breaker_failures"],
        group="policy",
        kind="int",
    ),
    Setting(
        "tier_breaker_reset",
        1.0,
        "Seconds before an open breaker lets a half-open probe through.",
        tiers.VALUE_CHECKS["tier_breaker_reset"],
        group="policy",
        kind="seconds",
    ),
    # -- what engine pods read (the connector, `Client`); the operator hands these out in its ConfigMap
    Setting(
        "url",
        None,
        "The pool: grpc:// or grpcs:// URL of a node, an agent, `kvpool up` or the pool's "
        "Service, or a comma list of node URLs (flag of `kvpool status`; connector: extra_config `url`).",
        group="client",
        kind="URL",
        commands=frozenset(),
        readers=_CLIENT_ONLY,
        flag_name="--url",
    ),
    Setting(
        "chunk_size",
        256,
        "Tokens per chunk, part of every chunk key (connector: extra_config `chunk_size`).",
        integer(1, 1 << 20),
        group="client",
        kind="int",
        commands=frozenset(),
        readers=_CLIENT_ONLY,
        flag_name="",
    ),
    Setting(
        "tls_ca_file",
        None,
        "CA certificate (PEM) that clients and agents verify a grpcs:// pool, lookup service or "
        "peer agent against (flag of `kvpool status`; default: the system's roots).",
        path,
        group="client",
        kind="path",
        commands=_AGENT_ONLY,
        readers=frozenset({AGENT, CLIENT}),
        flag_name="--tls-ca-file",
    ),
    Setting(
        "auth_token",
        None,
        "Bearer token that clients send (connector; or KVPOOL_AUTH_TOKEN_FILE).",
        group="client",
        commands=frozenset(),
        readers=_CLIENT_ONLY,
        secret=True,
        flag_name="",
    ),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in SETTINGS_LIST}

GROUPS: dict[str, str] = {
    "node": "Node: addresses and identity",
    "pool": "Pool membership",
    "capacity": "Memory, disk and limits",
    "security": "Auth and TLS",
    "p2p": "P2P: lookup service and agent",
    "transport": "Zero-copy transfers (NIXL)",
    "tiers": "Shared tiers (Redis/Valkey, S3)",
    "policy": "Shared-tier policy",
    "client": "Clients (engine pods, `kvpool status`)",
}


def by_env(name: str) -> Setting | None:
    """The setting whose env var is `name`, if any."""
    if not name.startswith("KVPOOL_"):
        return None
    return SETTINGS.get(name[len("KVPOOL_") :].lower())


def for_command(command: str) -> list[Setting]:
    """The settings that are flags of `command`, in registry order."""
    return [s for s in SETTINGS_LIST if command in s.commands]


def default(name: str, command: str | None = None) -> Any:
    setting = SETTINGS[name]
    return setting.value(setting.default_for(command))


# -- node settings ---------------------------------------------------------------------------------


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
    tls: ServerTLS | None = None
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
    values: Mapping[str, Any], *, auth_token: str | None = None, tls: ServerTLS | None = None
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


# -- agent settings --------------------------------------------------------------------------------


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
    tls: ServerTLS | None = None

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
    tls: ServerTLS | None = None,
) -> AgentSettings:
    """A validated AgentSettings from parsed values (missing → the agent's defaults); an empty
    agent id becomes `hostname`. Pure, like node_settings."""
    full = {s.name: s.value(s.default_for(AGENT)) for s in for_command(AGENT)} | dict(values)
    if not full.get("agent_id"):
        full["agent_id"] = hostname
    settings = AgentSettings(**{name: full[name] for name in _AGENT_FIELDS}, auth_token=auth_token, tls=tls)
    settings.validate()
    return settings


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


def check_node_env(env: Mapping[str, str]) -> None:
    """Raise ValueError if `kvpool node` would refuse this environment (or it holds an unknown
    `KVPOOL_*` name). Files named by the settings are not read: the caller cannot see them."""
    unknown = sorted(name for name in env if name.startswith("KVPOOL_") and by_env(name) is None)
    if unknown:
        raise ValueError(f"no kvpool setting reads {', '.join(unknown)}")
    node_settings(parse_env(env))


# -- the settings reference (docs/settings.md) ------------------------------------------------------

BEGIN = "<!-- BEGIN GENERATED SETTINGS REFERENCE -->"
END = "<!-- END GENERATED SETTINGS REFERENCE -->"


def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def _default_text(s: Setting) -> str:
    if s.secret or s.default in (None, ""):
        return "—"
    if isinstance(s.default, bool):
        return "on" if s.default else "off"
    others = "".join(f" ({command}: `{value}`)" for command, value in s.command_defaults)
    return f"`{s.default}`{others}"


def _readers(s: Setting) -> str:
    names = []
    if s.commands:
        names.append(", ".join(f"`kvpool {c}`" for c in sorted(s.commands)))
    if CLIENT in s.readers:
        names.append("clients")
    return "; ".join(names)


def render_reference() -> str:
    """The generated block: one table per group."""
    out = [BEGIN, ""]
    for group, title in GROUPS.items():
        out += [
            f"### {title}",
            "",
            "| flag | env | type | default | read by | meaning |",
            "|---|---|---|---|---|---|",
        ]
        for s in (s for s in SETTINGS_LIST if s.group == group):
            flag = s.flag if s.flag else "—"
            if s.negatable:
                flag = f"{s.flag} / --no-{s.flag[2:]}"
            flag_cell = f"`{flag}`" if flag != "—" else flag
            out.append(
                f"| {flag_cell} | `{s.env}` | {s.kind} | {_default_text(s)} | {_readers(s)} | {_cell(s.help)} |"
            )
        out.append("")
    out.append(END)
    return "\n".join(out)


def replace_reference(doc: str) -> str:
    """`doc` with its generated block replaced by a fresh rendering."""
    start, end = doc.index(BEGIN), doc.index(END) + len(END)
    return doc[:start] + render_reference() + doc[end:]
