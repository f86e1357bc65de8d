"""Names, labels and owner references shared by every child builder.

Kept in one place so that every child of a pool carries the same identity: the operator finds,
updates and deletes children by these names, and users select them by these labels.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

GROUP = "kvpool.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "KVCachePool"
PLURAL = "kvcachepools"

VERSION_TAG = metadata.version("kvpool")
"""This operator's version: the tag of its default image and the chart's appVersion."""

MANAGER = "kvpool-operator"
"""Server-side-apply field manager and the `app.kubernetes.io/managed-by` value."""

# Longest pool name whose derived names still fit: StatefulSet pods get a label
# `controller-revision-hash: <sts>-<10 chars>` (≤ 63), and `<pool>-lookup` must stay a DNS label.
MAX_POOL_NAME = 45


def statefulset_name(pool: str) -> str:
    return pool


def headless_service_name(pool: str) -> str:
    return f"{pool}-nodes"


def client_service_name(pool: str) -> str:
    return pool


def lookup_name(pool: str) -> str:
    return f"{pool}-lookup"


def configmap_name(pool: str) -> str:
    """The contract's name for the ConfigMap that carries a pool's settings to pods."""
    return f"{pool}-kvpool"


_LABEL_VALUE_EDGE = re.compile(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$")


def image_version(image: str) -> str | None:
    """The tag of an image reference as a valid label value, or None when it has no tag.

    `registry:5000/kvpool` has no tag (the colon belongs to the registry's port), and a digest
    (`@sha256:…`) is no version; a tag is cut to 63 characters and trimmed to start and end
    alphanumeric, as label values must."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" not in last:
        return None
    tag = last.rsplit(":", 1)[1][:63]
    tag = _LABEL_VALUE_EDGE.sub("", tag)
    return tag or None


def labels(pool: str, component: str, version: str | None = None) -> dict[str, str]:
    """The `app.kubernetes.io/*` labels every child carries."""
    out = {
        "app.kubernetes.io/name": "kvpool",
        "app.kubernetes.io/instance": pool,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kvpool",
        "app.kubernetes.io/managed-by": MANAGER,
    }
    if version:
        out["app.kubernetes.io/version"] = version
    return out


def selector(pool: str, component: str) -> dict[str, str]:
    """The immutable subset of labels used in selectors (never includes the version)."""
    return {
        "app.kubernetes.io/name": "kvpool",
        "app.kubernetes.io/instance": pool,
        "app.kubernetes.io/component": component,
    }


def selector_string(pool: str, component: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(pool, component).items())


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """A controller owner reference to the pool, so that deleting the pool deletes its children."""
    meta = owner["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(owner: dict[str, Any], name: str, component: str, version: str | None = None) -> dict[str, Any]:
    """Child metadata: name, namespace, labels and the owner reference."""
    pool = owner["metadata"]["name"]
    return {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": labels(pool, component, version),
        "ownerReferences": [owner_reference(owner)],
    }
