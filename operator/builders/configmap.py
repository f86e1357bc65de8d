"""The ConfigMap `<pool>-kvpool`: the pool's settings as `KVPOOL_*` variables, for nodes and clients.

Cache nodes load it with `envFrom`; engine pods load it the same way (by hand today, by the webhook
once it exists), so clients and nodes agree on the pool without copying values. Every key is a
setting of the registry that the node or a client reads (a test checks each against its reader).
Nothing here depends on `replicas`: scaling must not change the pod template, whose config hash
digests this data.
"""

from __future__ import annotations

from typing import Any

from .. import naming
from ..settings import PoolSettings
from .common import CA_KEY, DISK_DIR, TLS_DIR, endpoints, env_values, headless_dns


def values(s: PoolSettings) -> dict[str, Any]:
    """The pool's settings by registry name."""
    out: dict[str, Any] = {
        "pool_name": s.name,
        "url": endpoints(s)["grpc"],
        "chunk_size": s.chunk_size,
        # The spec's value, not capped at the replicas (that would change on scale): the client and
        # the nodes cap it at the live members.
        "replication_factor": s.replication_factor,
        "peers": headless_dns(s),
        "handoff_deadline": s.handoff_deadline,
        "memory": s.cache_bytes,
        "max_value_size": s.max_value_size,
        "high_watermark": s.high_watermark,
        "low_watermark": s.low_watermark,
    }
    lookup = endpoints(s).get("lookup")
    if lookup:  # agents ask it and publish to it; nodes publish to it
        out["lookup_url"] = lookup
    if s.tls_secret:
        out["tls_ca_file"] = f"{TLS_DIR}/{CA_KEY}"
    if s.disk_size:
        out["disk_dir"] = DISK_DIR
        out["disk_size"] = s.disk_budget
    if s.redis_url:
        out["redis_url"] = s.redis_url
        out["redis_prefix"] = s.redis_key_prefix
    if s.s3_url:
        out["s3_url"] = s.s3_url
    if s.s3_endpoint:
        out["s3_endpoint"] = s.s3_endpoint
    if s.s3_region:
        out["s3_region"] = s.s3_region
    return out


def data(s: PoolSettings) -> dict[str, str]:
    return env_values(values(s))


def build(owner: dict[str, Any], s: PoolSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": naming.metadata(owner, naming.configmap_name(s.name), "config"),
        "data": data(s),
    }
