"""The ConfigMap `<pool>-kvpool`: a pool's settings as `KVPOOL_*` variables, for nodes and clients.

Cache nodes load it with `envFrom`; the webhook hands it to vLLM pods the same way, so clients and
nodes agree on the hashing parameters without copying them by hand.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from . import naming
from .settings import PoolSettings

NODE_PORT, NODE_HTTP_PORT, NODE_DATA_PORT = 7400, 7401, 7402
LOOKUP_PORT, LOOKUP_HTTP_PORT = 7410, 7411
DISK_DIR = "/var/lib/kvpool"


def endpoints(s: PoolSettings) -> dict[str, Any]:
    """Where clients reach the pool (also reported in the status)."""
    domain = f"{s.namespace}.svc"
    headless = naming.headless_service_name(s.name)
    out: dict[str, Any] = {
        "grpc": f"grpc://{naming.client_service_name(s.name)}.{domain}:{NODE_PORT}",
        "http": f"http://{naming.client_service_name(s.name)}.{domain}:{NODE_HTTP_PORT}",
        "nodes": [
            f"{naming.statefulset_name(s.name)}-{i}.{headless}.{domain}:{NODE_PORT}"
            for i in range(s.replicas)
        ],
    }
    if s.lookup_replicas:
        out["lookup"] = f"grpc://{naming.lookup_name(s.name)}.{domain}:{LOOKUP_PORT}"
    return out


def data(s: PoolSettings) -> dict[str, str]:
    """The ConfigMap's data: one `KVPOOL_*` entry per setting, plus `pool.json` for humans and tools."""
    ep = endpoints(s)
    env: dict[str, str] = {
        "KVPOOL_POOL_NAME": s.name,
        "KVPOOL_URL": ep["grpc"],
        "KVPOOL_NODES": ",".join(ep["nodes"]),
        "KVPOOL_MEMORY": str(s.cache_bytes),
        "KVPOOL_MAX_VALUE_SIZE": str(s.max_value_size),
        "KVPOOL_CHUNK_SIZE": str(s.chunk_size),
        "KVPOOL_HASH_ALGORITHM": s.hashing()["algorithm"],
        "KVPOOL_FORMAT_VERSION": str(s.hashing()["formatVersion"]),
        "KVPOOL_PLACEMENT": s.hashing()["placement"],
        "KVPOOL_REPLICATION_FACTOR": str(s.effective_replication),
        "KVPOOL_EVICTION_POLICY": s.eviction_policy,
        "KVPOOL_HIGH_WATERMARK": str(s.high_watermark),
        "KVPOOL_LOW_WATERMARK": str(s.low_watermark),
        "KVPOOL_AUTH": "token" if s.auth_token else "none",
        "KVPOOL_TLS": "true" if s.tls_secret else "false",
    }
    if s.lookup_replicas:
        env["KVPOOL_LOOKUP_URL"] = ep["lookup"]
    if s.disk_size:
        env["KVPOOL_DISK_DIR"] = DISK_DIR
        env["KVPOOL_DISK_SIZE"] = str(s.disk_budget)
    if s.redis_url:
        env["KVPOOL_REDIS_URL"] = s.redis_url
        env["KVPOOL_REDIS_PREFIX"] = s.redis_key_prefix
    if s.s3_url:
        env["KVPOOL_S3_URL"] = s.s3_url
    if s.s3_endpoint:
        env["KVPOOL_S3_ENDPOINT"] = s.s3_endpoint
    if s.s3_region:
        env["KVPOOL_S3_REGION"] = s.s3_region
    summary = {"hashing": s.hashing(), "endpoints": ep, "env": env}
    return {**env, "pool.json": json.dumps(summary, indent=2, sort_keys=True)}


def config_hash(s: PoolSettings) -> str:
    """A digest of the ConfigMap, stamped on pod templates so that a settings change rolls the pods."""
    return hashlib.sha256(json.dumps(data(s), sort_keys=True).encode()).hexdigest()[:16]


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": naming.metadata(owner, naming.configmap_name(s.name), "config"),
        "data": data(s),
    }
