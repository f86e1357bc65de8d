"""A pool's spec turned into effective settings, with every check the API server cannot make.

The CRD's schema rejects most bad specs at `kubectl apply`; this module repeats the checks that
matter (a cluster may run without the CRD's validation, e.g. an old CRD version) and adds the
cross-field ones (memory vs. the container limit, disk vs. its budget). Defaults here match the
CRD's defaults; a test keeps them equal.
"""

from __future__ import annotations

import dataclasses
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from kvpool.cachenode.record import VERSION as RECORD_FORMAT_VERSION
from kvpool.cachenode.sizes import parse_size

from . import naming, sizing

DEFAULT_IMAGE = "ghcr.io/kvpool/kvpool:0.1.0"
DEFAULT_REPLICAS = 3
DEFAULT_MEMORY = "4GiB"
DEFAULT_MAX_VALUE_SIZE = "64MiB"
DEFAULT_CHUNK_SIZE = 256
DEFAULT_LOOKUP_REPLICAS = 1
HASH_ALGORITHM = "blake3"
PLACEMENT = "rendezvous"
EVICTION_POLICIES = ("LRU", "FIFO")
REDIS_SCHEMES = ("redis", "rediss", "valkey", "valkeys")

_S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|m)?$")
_QUANTITY_UNITS = {
    None: 1, "m": Decimal("0.001"), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "E": 10**18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip


class InvalidSpec(ValueError):
    """A spec the operator will not roll out; the message goes to the ConfigValid condition."""


@dataclasses.dataclass(frozen=True)
class SecretKey:
    name: str
    key: str


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """Everything the builders need, already defaulted and checked."""

    name: str
    namespace: str
    replicas: int
    image: str
    image_pull_policy: str
    image_pull_secrets: tuple[str, ...]
    cache_bytes: int
    container_memory: int
    cpu_request: str | None
    cpu_limit: str | None
    max_value_size: int
    disk_size: str | None
    disk_budget: int
    storage_class: str | None
    disk_reclaim: str
    redis_url: str | None
    redis_key_prefix: str
    redis_username: SecretKey | None
    redis_password: SecretKey | None
    s3_url: str | None
    s3_endpoint: str | None
    s3_region: str | None
    s3_access_key: SecretKey | None
    s3_secret_key: SecretKey | None
    chunk_size: int
    replication_factor: int
    eviction_policy: str
    high_watermark: float
    low_watermark: float
    auth_token: SecretKey | None
    tls_secret: str | None
    lookup_replicas: int
    service_monitor: bool
    service_monitor_interval: str
    service_monitor_labels: dict[str, str]
    pdb_enabled: bool
    pdb_max_unavailable: int
    network_policy: bool
    client_pod_selector: dict[str, Any]
    client_namespace_selector: dict[str, Any] | None
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    affinity: dict[str, Any]
    priority_class: str | None

    @property
    def effective_replication(self) -> int:
        """Copies of each chunk actually kept: never more than there are nodes."""
        return max(1, min(self.replication_factor, self.replicas))

    def hashing(self) -> dict[str, Any]:
        """The parameters that decide chunk keys and placement; clients must agree on them."""
        return {
            "algorithm": HASH_ALGORITHM,
            "chunkSize": self.chunk_size,
            "formatVersion": RECORD_FORMAT_VERSION,
            "placement": PLACEMENT,
            "replicationFactor": self.effective_replication,
        }


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity (`4Gi`, `512M`, `1.5`) as a number."""
    if isinstance(text, int | float):
        return Decimal(str(text))
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise InvalidSpec(f"{text!r} is not a Kubernetes quantity (e.g. 4Gi, 512Mi)")
    try:
        return Decimal(match.group(1)) * _QUANTITY_UNITS[match.group(2)]
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise InvalidSpec(f"{text!r} is not a Kubernetes quantity") from exc


def _size(value: Any, field: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise InvalidSpec(f"spec.{field}: {exc}") from exc


def _int(spec: dict[str, Any], field: str, default: int, low: int, high: int) -> int:
    value = spec.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidSpec(f"spec.{field} must be an integer from {low} to {high}, got {value!r}")
    return value


def _secret_key(ref: dict[str, Any] | None, field: str, default_key: str) -> SecretKey | None:
    if not ref:
        return None
    name = ref.get("name")
    if not name or not _DNS_LABEL.match(name.replace(".", "-")):
        raise InvalidSpec(f"spec.{field}.name must name a Secret, got {name!r}")
    return SecretKey(name, ref.get("key", default_key))


def _memory(spec: dict[str, Any], max_value: int) -> tuple[int, int]:
    """(cache bytes, container memory) from spec.memory and/or resources.limits.memory."""
    limit_text = (spec.get("resources") or {}).get("limits", {}).get("memory")
    limit = int(parse_quantity(limit_text)) if limit_text is not None else None
    if spec.get("memory") is None and limit is not None:
        cache = sizing.cache_within(limit, max_value)
        if cache < sizing.MIN_CACHE:
            need = sizing.quantity(sizing.container_memory(sizing.MIN_CACHE, max_value))
            raise InvalidSpec(
                f"spec.resources.limits.memory {limit_text} leaves no room for a cache after the node's "
                f"overhead; use at least {need} or set spec.memory"
            )
        return cache, limit
    cache = _size(spec.get("memory", DEFAULT_MEMORY), "memory")
    if cache < sizing.MIN_CACHE:
        raise InvalidSpec(f"spec.memory must be at least 64MiB, got {spec.get('memory')!r}")
    need = sizing.container_memory(cache, max_value)
    if limit is not None and limit < need:
        raise InvalidSpec(
            f"spec.resources.limits.memory {limit_text} is below spec.memory {spec.get('memory')} plus the "
            f"node's overhead ({sizing.quantity(need)} needed); raise the limit, lower spec.memory, "
            "or leave the limit out so the operator derives it"
        )
    return cache, limit if limit is not None else need


def parse(name: str, namespace: str, spec: dict[str, Any]) -> PoolSettings:
    """Effective settings of pool `namespace/name`, or InvalidSpec saying what to fix."""
    if len(name) > naming.MAX_POOL_NAME:
        raise InvalidSpec(f"pool name {name!r} is longer than {naming.MAX_POOL_NAME} characters")
    replicas = _int(spec, "replicas", DEFAULT_REPLICAS, 0, 1000)
    chunk_size = _int(spec, "chunkSize", DEFAULT_CHUNK_SIZE, 16, 65536)
    if chunk_size % 16:
        raise InvalidSpec(
            f"spec.chunkSize must be a multiple of 16 (the engine's block size), got {chunk_size}"
        )
    replication = _int(spec, "replicationFactor", 1, 1, 5)
    max_value = _size(spec.get("maxValueSize", DEFAULT_MAX_VALUE_SIZE), "maxValueSize")
    cache, container = _memory(spec, max_value)
    resources = spec.get("resources") or {}
    cpu_limit = resources.get("limits", {}).get("cpu")
    cpu_request = resources.get("requests", {}).get("cpu", cpu_limit)
    for cpu in (cpu_limit, cpu_request):
        if cpu is not None:
            parse_quantity(cpu)
    if (
        cpu_limit is not None
        and cpu_request is not None
        and parse_quantity(cpu_request) > parse_quantity(cpu_limit)
    ):
        raise InvalidSpec(
            f"spec.resources.requests.cpu {cpu_request} exceeds spec.resources.limits.cpu {cpu_limit}"
        )

    disk = spec.get("disk") or {}
    disk_size = disk.get("size")
    disk_budget = 0
    if disk_size is not None:
        disk_budget = sizing.disk_budget(int(parse_quantity(disk_size)), max_value)
        if disk_budget <= 0:
            raise InvalidSpec(
                f"spec.disk.size {disk_size} is too small for a disk tier (values up to {max_value} B)"
            )

    tiers = spec.get("tiers") or {}
    redis = tiers.get("redis") or {}
    redis_url = redis.get("url")
    if redis_url is not None and redis_url.split("://", 1)[0] not in REDIS_SCHEMES:
        raise InvalidSpec(
            f"spec.tiers.redis.url must start with redis://, rediss:// or valkey://, got {redis_url!r}"
        )
    redis_secret = redis.get("credentialsSecret") or {}
    s3 = tiers.get("s3") or {}
    s3_url = s3.get("url")
    if s3_url is not None and not _S3_URL.match(s3_url):
        raise InvalidSpec(f"spec.tiers.s3.url must look like s3://bucket/prefix, got {s3_url!r}")
    if s3.get("endpoint") is not None and not re.match(r"^https?://", s3["endpoint"]):
        raise InvalidSpec(f"spec.tiers.s3.endpoint must be an http(s) URL, got {s3['endpoint']!r}")
    s3_secret = s3.get("credentialsSecret") or {}

    eviction = spec.get("eviction") or {}
    policy = eviction.get("policy", "LRU")
    if policy not in EVICTION_POLICIES:
        raise InvalidSpec(
            f"spec.eviction.policy must be one of {', '.join(EVICTION_POLICIES)}, got {policy!r}"
        )
    high = float(eviction.get("highWatermark", 0.95))
    low = float(eviction.get("lowWatermark", 0.85))
    if not 0 < low < high <= 1:
        raise InvalidSpec(f"spec.eviction needs 0 < lowWatermark < highWatermark ≤ 1, got {low} and {high}")

    auth = spec.get("auth") or {}
    tls = spec.get("tls") or {}
    lookup = spec.get("lookup") or {}
    metrics = (spec.get("metrics") or {}).get("serviceMonitor") or {}
    pdb = spec.get("podDisruptionBudget") or {}
    netpol = spec.get("networkPolicy") or {}
    sched = spec.get("scheduling") or {}
    pdb_max = pdb.get("maxUnavailable", 1)
    if not isinstance(pdb_max, int) or pdb_max < 1:
        raise InvalidSpec(
            f"spec.podDisruptionBudget.maxUnavailable must be a positive integer, got {pdb_max!r}"
        )

    return PoolSettings(
        name=name,
        namespace=namespace,
        replicas=replicas,
        image=spec.get("image") or DEFAULT_IMAGE,
        image_pull_policy=spec.get("imagePullPolicy", "IfNotPresent"),
        image_pull_secrets=tuple(s["name"] for s in spec.get("imagePullSecrets") or ()),
        cache_bytes=cache,
        container_memory=container,
        cpu_request=cpu_request,
        cpu_limit=cpu_limit,
        max_value_size=max_value,
        disk_size=disk_size,
        disk_budget=disk_budget,
        storage_class=disk.get("storageClassName"),
        disk_reclaim=disk.get("reclaimPolicy", "Retain"),
        redis_url=redis_url,
        redis_key_prefix=redis.get("keyPrefix") or f"kvpool:{namespace}:{name}:",
        redis_username=_secret_key(
            {**redis_secret, "key": redis_secret.get("usernameKey", "username")}
            if redis_secret.get("usernameKey")
            else None,
            "tiers.redis.credentialsSecret",
            "username",
        ),
        redis_password=_secret_key(
            {**redis_secret, "key": redis_secret.get("passwordKey", "password")} if redis_secret else None,
            "tiers.redis.credentialsSecret",
            "password",
        ),
        s3_url=s3_url,
        s3_endpoint=s3.get("endpoint"),
        s3_region=s3.get("region"),
        s3_access_key=_secret_key(
            {**s3_secret, "key": s3_secret.get("accessKeyIdKey", "accessKeyId")} if s3_secret else None,
            "tiers.s3.credentialsSecret",
            "accessKeyId",
        ),
        s3_secret_key=_secret_key(
            {**s3_secret, "key": s3_secret.get("secretAccessKeyKey", "secretAccessKey")}
            if s3_secret
            else None,
            "tiers.s3.credentialsSecret",
            "secretAccessKey",
        ),
        chunk_size=chunk_size,
        replication_factor=replication,
        eviction_policy=policy,
        high_watermark=high,
        low_watermark=low,
        auth_token=_secret_key(auth.get("tokenSecret"), "auth.tokenSecret", "token"),
        tls_secret=tls.get("secretName"),
        lookup_replicas=_int(lookup, "replicas", DEFAULT_LOOKUP_REPLICAS, 0, 16),
        service_monitor=bool(metrics.get("enabled", False)),
        service_monitor_interval=metrics.get("interval", "30s"),
        service_monitor_labels=dict(metrics.get("labels") or {}),
        pdb_enabled=bool(pdb.get("enabled", True)),
        pdb_max_unavailable=pdb_max,
        network_policy=bool(netpol.get("enabled", False)),
        client_pod_selector=dict(netpol.get("clientPodSelector") or {}),
        client_namespace_selector=netpol.get("clientNamespaceSelector"),
        node_selector=dict(sched.get("nodeSelector") or {}),
        tolerations=list(sched.get("tolerations") or []),
        affinity=dict(sched.get("affinity") or {}),
        priority_class=sched.get("priorityClassName"),
    )
