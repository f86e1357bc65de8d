"""Settings of the shared tiers (Redis/Valkey, S3) and the pool's tier policy, parsed strictly.

Pure: no sockets, no files read. Every bad value raises ValueError with a message that names the
flag and shows a valid example, so `kvpool node` can print it as a one-line error.

The registry (tier_entries.py) gives every setting its flag and `KVPOOL_<NAME>` env var, with the
checks in `VALUE_CHECKS`; `SharedTiersConfig.from_options(**kwargs)` turns the parsed flags into
config objects, from which the server builds its tiers (server/tiers/shared_factory.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from kvpool.cachenode.core.sizes import parse_size

MiB = 1024 * 1024
MAX_REDIS_PART = 8 * MiB  # one Redis value never exceeds this: big values choke one connection
S3_MIN_PART = 5 * MiB  # S3's floor for every multipart part but the last

_REDIS_SCHEMES = {"redis": False, "valkey": False, "rediss": True, "valkeys": True}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_POOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,62}$")
_CERT_REQS = {"none", "optional", "required"}

WriteMode = Literal["through", "back"]


@dataclass(frozen=True, slots=True)
class RedisConfig:
    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_cert_reqs: str = "required"
    prefix: bytes = b"kvpool:default:"
    ttl: float | None = None
    part_size: int = MAX_REDIS_PART
    timeout: float = 1.0
    connect_timeout: float = 0.5
    connections: int = 8

    @property
    def display_url(self) -> str:
        """The URL without secrets, for logs and status."""
        scheme = "rediss" if self.tls else "redis"
        user = f"{self.username}:***@" if self.username else ("***@" if self.password else "")
        return f"{scheme}://{user}{self.host}:{self.port}/{self.db}"


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False
    multipart_threshold: int = 16 * MiB
    part_size: int = 8 * MiB
    read_part_size: int = 8 * MiB  # 0: read each object with one plain GET
    concurrency: int = 8
    timeout: float = 5.0
    connect_timeout: float = 1.0

    def object_key(self, hex_key: str) -> str:
        return f"{self.prefix}/{hex_key}" if self.prefix else hex_key


@dataclass(frozen=True, slots=True)
class TierPolicy:
    """How the node uses its shared tiers (per pool; later also from the KVCachePool CRD).

    write: "through" queues every put for the shared tiers at once (in the background);
           "back" writes a chunk to the shared tiers only when the node evicts it locally
           (demotion before drop), which saves shared-tier bandwidth for short-lived chunks.
    promote: copy a shared-tier hit into L1/L2 so the next read is local.
    """

    order: tuple[str, ...] = ("redis", "s3")
    write: WriteMode = "through"
    promote: bool = True
    queue_items: int = 1024
    queue_bytes: int = 512 * MiB
    breaker_failures: int = 3
    breaker_reset: float = 1.0


@dataclass(frozen=True, slots=True)
class SharedTiersConfig:
    pool: str = "default"
    redis: RedisConfig | None = None
    s3: S3Config | None = None
    policy: TierPolicy = TierPolicy()

    @property
    def enabled(self) -> tuple[str, ...]:
        have = {"redis": self.redis is not None, "s3": self.s3 is not None}
        return tuple(name for name in self.policy.order if have[name])

    @classmethod
    def from_options(
        cls,
        *,
        pool_name: str = "default",
        redis_url: str | None = None,
        redis_username: str | None = None,
        redis_password: str | None = None,
        redis_prefix: str | None = None,
        redis_ttl: float | str | None = None,
        redis_part_size: str | int = MAX_REDIS_PART,
        redis_timeout: float = 1.0,
        redis_connections: int = 8,
        s3_url: str | None = None,
        s3_endpoint: str | None = None,
        s3_region: str | None = None,
        s3_path_style: bool | None = None,
        s3_multipart_threshold: str | int = 16 * MiB,
        s3_part_size: str | int = 8 * MiB,
        s3_read_part_size: str | int = 8 * MiB,
        s3_concurrency: int = 8,
        s3_timeout: float = 5.0,
        tier_order: str = "redis,s3",
        tier_write: str = "through",
        tier_promote: bool = True,
        tier_queue_items: int = 1024,
        tier_queue_size: str | int = 512 * MiB,
        tier_breaker_failures: int = 3,
        tier_breaker_reset: float = 1.0,
        **_ignored: object,
    ) -> SharedTiersConfig:
        """Build from CLI/env values (names as the flags, dashes → underscores)."""
        check = VALUE_CHECKS
        pool = parse_pool_name(pool_name)
        redis = None
        if redis_url:
            prefix = (redis_prefix if redis_prefix is not None else f"kvpool:{pool}:").encode()
            credentials = {
                name: value
                for name, value in (("username", redis_username), ("password", redis_password))
                if value  # from a Secret via KVPOOL_REDIS_USERNAME/PASSWORD; wins over the URL's
            }
            redis = parse_redis_url(
                redis_url,
                **credentials,
                prefix=prefix,
                ttl=check["redis_ttl"](redis_ttl),
                part_size=check["redis_part_size"](redis_part_size),
                timeout=check["redis_timeout"](redis_timeout),
                connections=check["redis_connections"](redis_connections),
            )
        s3 = None
        if s3_url:
            part = check["s3_part_size"](s3_part_size)
            s3 = parse_s3_url(
                s3_url,
                pool=pool,
                endpoint=s3_endpoint,
                region=s3_region or None,
                path_style=s3_path_style,
                multipart_threshold=_size(s3_multipart_threshold, "--s3-multipart-threshold", part),
                part_size=part,
                read_part_size=check["s3_read_part_size"](s3_read_part_size),
                concurrency=check["s3_concurrency"](s3_concurrency),
                timeout=check["s3_timeout"](s3_timeout),
            )
        elif s3_endpoint:
            raise ValueError("--s3-endpoint needs --s3-url (e.g. --s3-url s3://bucket/prefix)")
        policy = TierPolicy(
            order=parse_tier_order(tier_order),
            write=parse_write_mode(tier_write),
            promote=bool(tier_promote),
            queue_items=check["tier_queue_items"](tier_queue_items),
            queue_bytes=check["tier_queue_size"](tier_queue_size),
            breaker_failures=check["tier_breaker_failures"](tier_breaker_failures),
            breaker_reset=check["tier_breaker_reset"](tier_breaker_reset),
        )
        return cls(pool=pool, redis=redis, s3=s3, policy=policy)


# -- parsers --------------------------------------------------------------------------------------


def parse_pool_name(name: str) -> str:
    if not _POOL_RE.match(name or ""):
        raise ValueError(
            f"--pool-name {name!r} must be 1-63 letters, digits, '.', '_' or '-' (e.g. llama3-prod)"
        )
    return name


def parse_redis_url(url: str, **overrides: object) -> RedisConfig:
    """redis://, rediss://, valkey://, valkeys:// with optional user:password, port, /db and
    TLS query options (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs)."""
    example = "(e.g. redis://:secret@cache:6379/0 or rediss://user:secret@cache:6380/0)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"--redis-url {_redact(url)!r} is not a valid URL: {exc} {example}") from None
    scheme = parts.scheme.lower()
    if scheme not in _REDIS_SCHEMES:
        raise ValueError(
            f"--redis-url scheme {parts.scheme!r} is not one of redis://, rediss://, valkey://, valkeys:// {example}"
        )
    if not parts.hostname:
        raise ValueError(f"--redis-url {_redact(url)!r} has no host {example}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"--redis-url database {path!r} must be a number {example}")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = set(query) - {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"}
    if unknown:
        raise ValueError(f"--redis-url has unknown options {sorted(unknown)}")
    cert_reqs = query.get("ssl_cert_reqs", "required").lower()
    if cert_reqs not in _CERT_REQS:
        raise ValueError(f"--redis-url ssl_cert_reqs must be one of {sorted(_CERT_REQS)}")
    tls = _REDIS_SCHEMES[scheme]
    if not tls and any(k.startswith("ssl_") for k in query):
        raise ValueError("--redis-url TLS options need rediss:// or valkeys://")
    cfg = RedisConfig(
        host=parts.hostname,
        port=port or 6379,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
        tls_ca_file=query.get("ssl_ca_certs"),
        tls_cert_file=query.get("ssl_certfile"),
        tls_key_file=query.get("ssl_keyfile"),
        tls_cert_reqs=cert_reqs,
    )
    return _replace(cfg, overrides)


def parse_s3_url(
    url: str,
    *,
    pool: str = "default",
    endpoint: str | None = None,
    path_style: bool | None = None,
    **overrides,
) -> S3Config:
    """s3://bucket[/prefix]; without a prefix the pool's objects go under kvpool/<pool>."""
    example = "(e.g. s3://my-bucket/kvpool/prod)"
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise ValueError(f"--s3-url {url!r} must start with s3:// {example}")
    bucket = parts.netloc
    if not bucket:
        raise ValueError(f"--s3-url {url!r} has no bucket {example}")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ValueError(f"--s3-url bucket {bucket!r} is not a valid S3 bucket name {example}")
    if parts.query or parts.fragment:
        raise ValueError(f"--s3-url {url!r} must not have '?' or '#' parts {example}")
    prefix = parts.path.strip("/") or f"kvpool/{pool}"
    endpoint_url = parse_s3_endpoint(endpoint) if endpoint else None
    style = path_style if path_style is not None else endpoint_url is not None
    cfg = S3Config(bucket=bucket, prefix=prefix, endpoint_url=endpoint_url, path_style=style)
    return _replace(cfg, overrides)


def parse_s3_endpoint(endpoint: str) -> str:
    """An S3-compatible endpoint, http(s)://host[:port], without a trailing slash."""
    ep = urlsplit(endpoint)
    if ep.scheme not in ("http", "https") or not ep.netloc:
        raise ValueError(f"--s3-endpoint {endpoint!r} must be http(s)://host[:port]")
    return endpoint.rstrip("/")


def parse_ttl(value: float | str | None, flag: str) -> float | None:
    """Seconds ('3600', '90s', '15m', '2h', '7d'); 0 or empty means no TTL."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value).lower())
        if not match:
            raise ValueError(f"{flag} {value!r} is not a duration (e.g. 3600, 90s, 15m, 2h, 7d)")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if seconds < 0:
        raise ValueError(f"{flag} must not be negative")
    if 0 < seconds < 0.001:
        raise ValueError(f"{flag} must be at least 1 ms")
    return seconds or None


def parse_tier_order(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in (text or "").split(",") if n.strip())
    bad = [n for n in names if n not in ("redis", "s3")]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"--tier-order {text!r} must list redis and/or s3 once each (e.g. redis,s3)")
    return names


def parse_write_mode(text: str) -> WriteMode:
    mode = (text or "").strip().lower().replace("write-", "")
    if mode not in ("through", "back"):
        raise ValueError(f"--tier-write {text!r} must be 'through' or 'back'")
    return mode  # type: ignore[return-value]


def _size(value: str | int, flag: str, low: int, high: int | None = None) -> int:
    try:
        n = parse_size(value)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None
    if n < low or (high is not None and n > high):
        upper = f" and at most {high} bytes" if high is not None else ""
        raise ValueError(f"{flag} must be at least {low} bytes{upper}, got {n}")
    return n


def _read_part(value: str | int) -> int:
    n = _size(value, "--s3-read-part-size", 0)
    if 0 < n < MiB:
        raise ValueError(f"--s3-read-part-size must be 0 (one GET per object) or at least 1MiB, got {n}")
    return n


def _positive(value: float, flag: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} {value!r} is not a number of seconds") from None
    if not x > 0:
        raise ValueError(f"{flag} must be positive, got {value!r}")
    return x


def _count(value: int, flag: str, low: int, high: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} {value!r} is not a whole number") from None
    if not low <= n <= high:
        raise ValueError(f"{flag} must be between {low} and {high}, got {n}")
    return n


def _replace(cfg, overrides: dict):
    from dataclasses import replace

    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _redact(url: str) -> str:
    return re.sub(r"//([^@/]*)@", "//***@", url)


VALUE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "redis_ttl": lambda v: parse_ttl(v, "--redis-ttl"),
    "redis_part_size": lambda v: _size(v, "--redis-part-size", 64 * 1024, MAX_REDIS_PART),
    "redis_timeout": lambda v: _positive(v, "--redis-timeout"),
    "redis_connections": lambda v: _count(v, "--redis-connections", 1, 256),
    "s3_endpoint": parse_s3_endpoint,
    "s3_multipart_threshold": lambda v: _size(v, "--s3-multipart-threshold", S3_MIN_PART),
    "s3_part_size": lambda v: _size(v, "--s3-part-size", S3_MIN_PART, 5 * 1024 * MiB),
    "s3_read_part_size": _read_part,
    "s3_concurrency": lambda v: _count(v, "--s3-concurrency", 1, 64),
    "s3_timeout": lambda v: _positive(v, "--s3-timeout"),
    "tier_queue_items": lambda v: _count(v, "--tier-queue-items", 1, 10_000_000),
    "tier_queue_size": lambda v: _size(v, "--tier-queue-size", MiB),
    "tier_breaker_failures": lambda v: _count(v, "--tier-breaker-failures", 1, 1000),
    "tier_breaker_reset": lambda v: _positive(v, "--tier-breaker-reset"),
}
"""One value's check, shared by `from_options` and the settings registry (tier_entries.py), which
gives each of these settings its flag, env var, default and help."""
