"""A pool's spec turned into effective settings, with every check the API server cannot make.

The CRD's schema rejects most bad specs at `kubectl apply`; this module repeats the checks that
matter (a cluster may run without the CRD's validation, e.g. an old CRD version) and adds the
cross-field ones (memory vs. the container limit, disk vs. its budget). Values that reach the
nodes are checked with the node's own parsers from the settings registry, the only part of
cachenode the operator imports. Defaults here match the CRD's defaults; a test keeps them equal.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from decimal import Decimal
from typing import Any

from kvpool.cachenode.core import settings as registry

from . import naming, sizing

IMAGE_REPOSITORY = "ghcr.io/kvpool/kvpool"
DEFAULT_IMAGE = f"{IMAGE_REPOSITORY}:{naming.VERSION_TAG}"
"""The image built from this version's Dockerfile (tag = the chart's appVersion = the package version)."""
PINNED_IMAGE = "kvpool.io/default-image"
"""Annotation on a pool without `spec.image`: the image it was created with. Later operator versions
keep using it, so an operator upgrade does not roll every pool; removing it (with the operator
running) moves the pool to the operator's current default."""


DEFAULT_REPLICAS = 3
DEFAULT_MEMORY = registry.SETTINGS["memory"].default
DEFAULT_MAX_VALUE_SIZE = "64MiB"  # below the node's own default: it sizes every node's memory overhead
DEFAULT_CHUNK_SIZE = registry.default("chunk_size")
DEFAULT_REPLICATION_FACTOR = registry.default("replication_factor")
DEFAULT_HANDOFF_DEADLINE = int(registry.default("handoff_deadline"))
DEFAULT_LOOKUP_REPLICAS = 1
MAX_LOOKUP_REPLICAS = 1
"""The lookup index lives in one process (holders resync to whichever replica they reach, so two
behind one Service would keep asking each other's holders to resync): 0 turns it off."""
HASH_ALGORITHM = "blake3"
PLACEMENT = "rendezvous"
EVICTION_POLICIES = ("LRU",)  # the only policy the node implements
DEFAULT_AGENT_MEMORY = "2GiB"
DEFAULT_AGENT_CPU_REQUEST = "250m"
DEFAULT_CPU_REQUEST = "250m"
"""A cache node's CPU request when the spec gives neither request nor limit: without one the
scheduler packs nodes onto busy machines and they get only leftover CPU under contention."""
DEFAULT_METRICS_NAMESPACE_SELECTOR: dict[str, Any] = {
    "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
}
"""Where Prometheus runs, for the NetworkPolicy's metrics rule (the namespace of kube-prometheus)."""
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
OWNED_NODE_SETTINGS = frozenset({
    "host", "port", "http_port", "data_port", "node_id", "advertise_host", "peers", "pool_name",
    "replication_factor", "handoff_deadline", "memory", "max_value_size", "disk_dir", "disk_size",
    "high_watermark", "low_watermark", "auth_token_file", "tls_cert_file", "tls_key_file",
    "redis_url", "redis_prefix", "redis_username", "redis_password", "s3_url", "s3_endpoint", "s3_region",
})  # fmt: skip
"""Node settings the operator derives from the spec (or Secrets): spec.extraArgs and spec.env may not
set them, or the pool's sizing, Services and placement would no longer match its nodes."""
SELECTOR_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


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
    handoff_deadline: int
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
    topology_spread: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    pod_annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    pod_labels: dict[str, str] = dataclasses.field(default_factory=dict)
    service_account: str | None = None
    extra_env: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    extra_args: tuple[str, ...] = ()
    service_type: str = "ClusterIP"
    service_annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    agent_enabled: bool = True
    agent_memory: int = 2 << 30
    agent_container_memory: int = 0
    agent_cpu_request: str | None = DEFAULT_AGENT_CPU_REQUEST
    agent_cpu_limit: str | None = None
    metrics_namespace_selector: dict[str, Any] = dataclasses.field(
        default_factory=lambda: copy.deepcopy(DEFAULT_METRICS_NAMESPACE_SELECTOR)
    )

    @property
    def effective_replication(self) -> int:
        """Copies of each chunk actually kept: never more than there are nodes."""
        return max(1, min(self.replication_factor, self.replicas))

    def hashing(self) -> dict[str, Any]:
        """The parameters that decide chunk keys and placement; clients must agree on them."""
        return {
            "algorithm": HASH_ALGORITHM,
            "chunkSize": self.chunk_size,
            "formatVersion": registry.RECORD_FORMAT_VERSION,
            "placement": PLACEMENT,
            "replicationFactor": self.effective_replication,
        }


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity (`4Gi`, `512M`, `1.5`) as a number; InvalidSpec if not one."""
    value = sizing.quantity_value(text)
    if value is None:
        raise InvalidSpec(f"{text!r} is not a Kubernetes quantity (e.g. 4Gi, 512Mi)")
    return value


def _size(value: Any, field: str) -> int:
    try:
        return registry.parse_size(value)
    except ValueError as exc:
        raise InvalidSpec(f"spec.{field}: {exc}") from exc


def _node_value(setting: str, value: Any, field: str) -> Any:
    """`value` checked by the node's own parser for `setting`: what the node refuses, the pool does."""
    try:
        return registry.SETTINGS[setting].parse(value)
    except ValueError as exc:
        raise InvalidSpec(f"spec.{field}: {exc}") from None


def _int(spec: dict[str, Any], field: str, default: int, low: int, high: int, path: str = "spec") -> int:
    value = spec.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidSpec(f"{path}.{field} must be an integer from {low} to {high}, got {value!r}")
    return value


def _secret_key(ref: dict[str, Any] | None, field: str, default_key: str) -> SecretKey | None:
    if not ref:
        return None
    name = ref.get("name")
    if not name or not _DNS_LABEL.match(name.replace(".", "-")):
        raise InvalidSpec(f"spec.{field}.name must name a Secret, got {name!r}")
    return SecretKey(name, ref.get("key", default_key))


def _memory(
    spec: dict[str, Any], max_value: int, path: str = "spec", default: str = DEFAULT_MEMORY
) -> tuple[int, int]:
    """(cache bytes, container memory) from <path>.memory and/or <path>.resources.limits.memory."""
    limit_text = (spec.get("resources") or {}).get("limits", {}).get("memory")
    limit = int(parse_quantity(limit_text)) if limit_text is not None else None
    if spec.get("memory") is None and limit is not None:
        cache = sizing.cache_within(limit, max_value)
        if cache < sizing.MIN_CACHE:
            need = sizing.quantity(sizing.container_memory(sizing.MIN_CACHE, max_value))
            raise InvalidSpec(
                f"{path}.resources.limits.memory {limit_text} leaves no room for a cache after the "
                f"process's overhead; use at least {need} or set {path}.memory"
            )
        return cache, limit
    field = f"{path}.memory".removeprefix("spec.")
    cache = _size(spec.get("memory", default), field)
    if cache < sizing.MIN_CACHE:
        raise InvalidSpec(f"{path}.memory must be at least 64MiB, got {spec.get('memory')!r}")
    need = sizing.container_memory(cache, max_value)
    if limit is not None and limit < need:
        raise InvalidSpec(
            f"{path}.resources.limits.memory {limit_text} is below {path}.memory {spec.get('memory')} plus "
            f"the process's overhead ({sizing.quantity(need)} needed); raise the limit, lower "
            f"{path}.memory, or leave the limit out so the operator derives it"
        )
    return cache, limit if limit is not None else need


def _cpu(
    resources: dict[str, Any], path: str, default_request: str | None = None
) -> tuple[str | None, str | None]:
    """(request, limit) of CPU; the request defaults to the limit, else to `default_request`."""
    limit = (resources.get("limits") or {}).get("cpu")
    request = (resources.get("requests") or {}).get("cpu", limit if limit is not None else default_request)
    for cpu in (limit, request):
        if cpu is not None:
            parse_quantity(cpu)
    if limit is not None and request is not None and parse_quantity(request) > parse_quantity(limit):
        raise InvalidSpec(
            f"{path}.resources.requests.cpu {request} exceeds {path}.resources.limits.cpu {limit}"
        )
    return (None if request is None else str(request)), (None if limit is None else str(limit))


def _node_setting_for_flag(word: str) -> tuple[registry.Setting, bool] | None:
    """The node setting a `--flag` names, and whether the word is its `--no-` form."""
    for setting in registry.for_command(registry.NODE):
        if word == setting.flag:
            return setting, False
        if setting.negatable and word == "--no-" + setting.flag[2:]:
            return setting, True
    return None


def _extra_args(args: list[Any]) -> tuple[str, ...]:
    """spec.extraArgs: node flags the operator does not set itself, each value checked by the node's parser."""
    out = tuple(str(a) for a in args)
    i = 0
    while i < len(out):
        word = out[i]
        name, eq, value = word.partition("=")
        if name == "--log-level":
            i += 1 if eq else 2
            continue
        found = _node_setting_for_flag(name)
        if found is None or not name.startswith("--"):
            raise InvalidSpec(f"spec.extraArgs: {word!r} is not a flag of `kvpool node` (docs/settings.md)")
        setting, negated = found
        if setting.name in OWNED_NODE_SETTINGS:
            raise InvalidSpec(
                f"spec.extraArgs: {name} is set by the operator from the pool's spec; use the spec field instead"
            )
        if setting.negatable or negated:
            i += 1
            continue
        if not eq:
            if i + 1 >= len(out):
                raise InvalidSpec(f"spec.extraArgs: {name} needs a value")
            value = out[i + 1]
            i += 1
        _node_value(setting.name, value, f"extraArgs {name}")
        i += 1
    return out


def _extra_env(env: list[Any]) -> list[dict[str, Any]]:
    """spec.env: any variable, but a `KVPOOL_*` one must be a node setting the operator does not set."""
    out = []
    for item in env:
        if not isinstance(item, dict) or not item.get("name"):
            raise InvalidSpec(f"spec.env: every entry needs a name, got {item!r}")
        name = str(item["name"])
        if name.startswith("KVPOOL_"):
            setting = registry.by_env(name)
            if setting is None or registry.NODE not in setting.commands:
                raise InvalidSpec(f"spec.env: {name} is not a setting of `kvpool node` (docs/settings.md)")
            if setting.name in OWNED_NODE_SETTINGS:
                raise InvalidSpec(f"spec.env: {name} is set by the operator from the pool's spec")
            if "value" in item:
                _node_value(setting.name, item["value"], f"env {name}")
        out.append(dict(item))
    return out


def _string_map(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidSpec(f"spec.{field} must map names to strings")
    return {str(k): v for k, v in value.items()}


def pinned_image(pool: dict[str, Any]) -> str | None:
    """The image pinned on `pool` by the operator (None: not pinned yet)."""
    return ((pool.get("metadata") or {}).get("annotations") or {}).get(PINNED_IMAGE) or None


def effective_spec(pool: dict[str, Any]) -> dict[str, Any]:
    """The pool's spec as the operator renders it: without `spec.image`, the pinned image.

    The one source of truth for a pool's node image: `parse(name, namespace, effective_spec(pool))`
    (the operator's children and the webhook's injected containers use the same image)."""
    spec = dict(pool.get("spec") or {})
    if not spec.get("image") and pinned_image(pool):
        spec["image"] = pinned_image(pool)
    return spec


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
    replication = _int(spec, "replicationFactor", DEFAULT_REPLICATION_FACTOR, 1, 5)
    handoff = _int(spec, "handoffDeadlineSeconds", DEFAULT_HANDOFF_DEADLINE, 0, 3600)
    max_value = _size(spec.get("maxValueSize", DEFAULT_MAX_VALUE_SIZE), "maxValueSize")
    cache, container = _memory(spec, max_value)
    cpu_request, cpu_limit = _cpu(spec.get("resources") or {}, "spec", DEFAULT_CPU_REQUEST)

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
    if redis_url is not None:
        _node_value("redis_url", redis_url, "tiers.redis.url")
    redis_secret = redis.get("credentialsSecret") or {}
    s3 = tiers.get("s3") or {}
    s3_url = s3.get("url")
    if s3_url is not None:
        _node_value("s3_url", s3_url, "tiers.s3.url")
    if s3.get("endpoint") is not None:
        _node_value("s3_endpoint", s3["endpoint"], "tiers.s3.endpoint")
    s3_secret = s3.get("credentialsSecret") or {}

    eviction = spec.get("eviction") or {}
    policy = eviction.get("policy", "LRU")
    if policy not in EVICTION_POLICIES:
        raise InvalidSpec(
            f"spec.eviction.policy must be one of {', '.join(EVICTION_POLICIES)}, got {policy!r}"
        )
    high = _node_value("high_watermark", eviction.get("highWatermark", 0.95), "eviction.highWatermark")
    low = _node_value("low_watermark", eviction.get("lowWatermark", 0.85), "eviction.lowWatermark")
    if not 0 < low < high <= 1:
        raise InvalidSpec(f"spec.eviction needs 0 < lowWatermark < highWatermark ≤ 1, got {low} and {high}")

    auth = spec.get("auth") or {}
    tls = spec.get("tls") or {}
    lookup = spec.get("lookup") or {}
    metrics = (spec.get("metrics") or {}).get("serviceMonitor") or {}
    pdb = spec.get("podDisruptionBudget") or {}
    netpol = spec.get("networkPolicy") or {}
    sched = spec.get("scheduling") or {}
    lookup_replicas = _int(lookup, "replicas", DEFAULT_LOOKUP_REPLICAS, 0, MAX_LOOKUP_REPLICAS, "spec.lookup")
    pdb_max = pdb.get("maxUnavailable", 1)
    if not isinstance(pdb_max, int) or pdb_max < 1:
        raise InvalidSpec(
            f"spec.podDisruptionBudget.maxUnavailable must be a positive integer, got {pdb_max!r}"
        )

    agent = spec.get("agent") or {}
    agent_memory, agent_container = _memory(agent, max_value, "spec.agent", DEFAULT_AGENT_MEMORY)
    agent_cpu_request, agent_cpu_limit = _cpu(
        agent.get("resources") or {}, "spec.agent", DEFAULT_AGENT_CPU_REQUEST
    )
    pod_labels = _string_map(spec.get("podLabels"), "podLabels")
    clash = sorted(set(pod_labels) & set(SELECTOR_LABELS))
    if clash:
        raise InvalidSpec(
            f"spec.podLabels may not set {', '.join(clash)} (the operator selects its pods by them)"
        )
    service = spec.get("service") or {}
    service_type = service.get("type", "ClusterIP")
    if service_type not in SERVICE_TYPES:
        raise InvalidSpec(
            f"spec.service.type must be one of {', '.join(SERVICE_TYPES)}, got {service_type!r}"
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
        handoff_deadline=handoff,
        eviction_policy=policy,
        high_watermark=high,
        low_watermark=low,
        auth_token=_secret_key(auth.get("tokenSecret"), "auth.tokenSecret", "token"),
        tls_secret=tls.get("secretName"),
        lookup_replicas=lookup_replicas,
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
        topology_spread=list(sched.get("topologySpreadConstraints") or []),
        pod_annotations=_string_map(spec.get("podAnnotations"), "podAnnotations"),
        pod_labels=pod_labels,
        service_account=spec.get("serviceAccountName"),
        extra_env=_extra_env(list(spec.get("env") or [])),
        extra_args=_extra_args(list(spec.get("extraArgs") or [])),
        service_type=service_type,
        service_annotations=_string_map(service.get("annotations"), "service.annotations"),
        agent_enabled=bool(agent.get("enabled", True)),
        agent_memory=agent_memory,
        agent_container_memory=agent_container,
        agent_cpu_request=agent_cpu_request,
        agent_cpu_limit=agent_cpu_limit,
        metrics_namespace_selector=copy.deepcopy(
            netpol.get("metricsNamespaceSelector", DEFAULT_METRICS_NAMESPACE_SELECTOR)
        ),
    )
