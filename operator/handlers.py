"""kopf handlers: every KVCachePool event ends in one idempotent `reconcile`.

Create, update and resume all render the full set of children and apply it (unchanged children get
no write). An invalid spec only updates the status, so running nodes keep serving the last good
configuration. Deleting a pool deletes its children explicitly (the garbage collector would too; the
finalizer makes the order deterministic and works where no collector runs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import kopf

from . import children, naming, settings, statefulset, status
from .kube import Kube, contains

STATUS_INTERVAL = float(os.environ.get("KVPOOL_STATUS_INTERVAL", "10"))
"""Seconds between status refreshes of each pool (rollouts report progress this often)."""

_RESOURCE = (naming.GROUP, naming.VERSION, naming.PLURAL)


def plain(value: Any) -> Any:
    """kopf's read-only body views as plain dicts and lists, for the pure builders."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _read_workloads(
    kube: Kube, name: str, namespace: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    sts = kube.get("apps/v1", "StatefulSet", namespace, naming.statefulset_name(name))
    lookup = kube.get("apps/v1", "Deployment", namespace, naming.lookup_name(name))
    return sts, lookup


def _set_status(body: dict[str, Any], patch: kopf.Patch, new: dict[str, Any]) -> None:
    if not contains(body.get("status") or {}, new):
        patch.status.update(new)


def evaluate(kube: Kube, pool: dict[str, Any]) -> tuple[settings.PoolSettings | None, str | None]:
    """The pool's effective settings, or why its spec cannot be rolled out."""
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]
    try:
        s = settings.parse(name, namespace, pool.get("spec") or {})
        running = kube.get("apps/v1", "StatefulSet", namespace, naming.statefulset_name(name))
        conflict = statefulset.immutable_change(running, statefulset.build(pool, s))
        if conflict:
            raise settings.InvalidSpec(conflict)
    except settings.InvalidSpec as exc:
        return None, str(exc)
    return s, None


def reconcile(body: Mapping[str, Any], patch: kopf.Patch, logger: Any) -> dict[str, str]:
    """Bring the pool's children to its spec; returns what happened to each child."""
    pool = plain(body)
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]
    with Kube() as kube:
        s, error = evaluate(kube, pool)
        if s is None:
            logger.error(f"Spec of {namespace}/{name} is invalid, children left as they are: {error}")
            kopf.warn(body, reason="InvalidSpec", message=str(error))
            sts, lookup = _read_workloads(kube, name, namespace)
            _set_status(pool, patch, status.compute(pool, None, error, sts, lookup))
            return {}
        monitors = s.service_monitor and kube.serves("monitoring.coreos.com/v1", "servicemonitors")
        if s.service_monitor and not monitors:
            logger.warning(
                "spec.metrics.serviceMonitor is on but the cluster has no ServiceMonitor kind; skipped"
            )
        outcome: dict[str, str] = {}
        for obj in children.desired(pool, s, monitors):
            outcome[f"{obj['kind']}/{obj['metadata']['name']}"] = kube.apply(obj)
        for api_version, kind, child in children.unwanted(s):
            # Look first: a reconcile of an unchanged pool sends no writes at all.
            if kube.get(api_version, kind, namespace, child) and kube.delete(
                api_version, kind, namespace, child
            ):
                outcome[f"{kind}/{child}"] = "deleted"
        sts, lookup = _read_workloads(kube, name, namespace)
        _set_status(pool, patch, status.compute(pool, s, None, sts, lookup))
    changed = {k: v for k, v in outcome.items() if v != "unchanged"}
    logger.info(f"Reconciled {namespace}/{name}: {changed or 'no changes'}")
    return outcome


@kopf.on.create(*_RESOURCE)
@kopf.on.update(*_RESOURCE)
@kopf.on.resume(*_RESOURCE)
def on_change(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    reconcile(body, patch, logger)


@kopf.on.delete(*_RESOURCE)
def on_delete(name: str, namespace: str, logger: kopf.Logger, **_: Any) -> None:
    with Kube() as kube:
        gone = [f"{kind}/{child}" for api_version, kind, child in children.all_names(name)
                if kube.delete(api_version, kind, namespace, child)]  # fmt: skip
    logger.info(f"Deleted pool {namespace}/{name}: removed {gone}")


@kopf.timer(*_RESOURCE, interval=STATUS_INTERVAL, initial_delay=STATUS_INTERVAL)
def refresh_status(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Follow rollouts and failures of the children between spec changes."""
    pool = plain(body)
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]
    with Kube() as kube:
        s, error = evaluate(kube, pool)
        sts, lookup = _read_workloads(kube, name, namespace)
    _set_status(pool, patch, status.compute(pool, s, error, sts, lookup))
