"""kopf handlers: every KVCachePool event ends in one idempotent `reconcile`.

Create, update and resume all render the full set of children and apply it (unchanged children get
no write). An invalid spec only updates the status, so running nodes keep serving the last good
configuration. Deleting a pool deletes its children explicitly (the garbage collector would too; the
finalizer makes the order deterministic and works where no collector runs).

kopf runs the status timer beside the change handlers, not after them. So that a status never
claims a generation whose children were not applied yet, the two take a per-pool lock, and the
timer reports only a generation that `reconcile` has already reported (it reads the pool afresh
under the lock and leaves a pool with a change in flight to the change handler).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import builders, naming, settings, status
from .builders import statefulset
from .kube import Kube, api_error, contains

STATUS_INTERVAL = float(os.environ.get("KVPOOL_STATUS_INTERVAL", "10"))
"""Seconds between status refreshes of each pool (rollouts report progress this often)."""

_RESOURCE = (naming.GROUP, naming.VERSION, naming.PLURAL)
POOL = (naming.API_VERSION, naming.KIND)

log = logging.getLogger("kvpool.operator")

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def pool_lock(namespace: str, name: str) -> Iterator[None]:
    """Serialises the handlers of one pool (kopf runs sync handlers in a thread pool)."""
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield


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
        builders.check(s)
        running = kube.get("apps/v1", "StatefulSet", namespace, naming.statefulset_name(name))
        conflict = statefulset.immutable_change(running, statefulset.build(pool, s, config_hash=""))
        if conflict:
            raise settings.InvalidSpec(conflict)
    except settings.InvalidSpec as exc:
        return None, str(exc)
    return s, None


def reconcile(body: Mapping[str, Any], patch: kopf.Patch, logger: Any) -> dict[str, str]:
    """Bring the pool's children to its spec; returns what happened to each child."""
    pool = plain(body)
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]
    with pool_lock(namespace, name), Kube() as kube:
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
        refused: list[str] = []
        for obj in builders.desired(pool, s, monitors):
            child = f"{obj['kind']}/{obj['metadata']['name']}"
            try:
                outcome[child] = kube.apply(obj)
            except ApiException as exc:
                outcome[child] = "refused"
                refused.append(f"the API server refused {child}: {api_error(exc)}")
        if refused:
            # In the status (Degraded, reason ApplyFailed), not only in the log; kopf retries.
            sts, lookup = _read_workloads(kube, name, namespace)
            kube.patch_status(
                *POOL, namespace, name, status.compute(pool, s, None, sts, lookup, refused="; ".join(refused))
            )
            raise kopf.TemporaryError("; ".join(refused), delay=30)
        for api_version, kind, child in builders.unwanted(s):
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


def refresh(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    """The status to patch onto a pool between spec changes, or None to leave it alone: the pool
    is gone, a change of its spec is in flight (the change handler reports it), or nothing moved."""
    pool = kube.get(*POOL, namespace, name)
    if pool is None:
        return None
    current = pool.get("status") or {}
    if (pool.get("metadata") or {}).get("generation") != current.get("observedGeneration"):
        return None
    s, error = evaluate(kube, pool)
    sts, lookup = _read_workloads(kube, name, namespace)
    new = status.compute(pool, s, error, sts, lookup)
    return None if contains(current, new) else new


_announced = threading.Event()


def forget_announcement() -> None:
    """A new operator run in this process announces its peering again."""
    _announced.clear()


@kopf.on.login()
def login(settings: kopf.OperatorSettings, logger: kopf.Logger, **kwargs: Any) -> kopf.ConnectionInfo | None:
    """kopf's own login (in-cluster, else kubeconfig); the first time, say how this replica runs."""
    info = kopf.login_via_client(settings=settings, logger=logger, **kwargs)
    if not _announced.is_set():
        _announced.set()
        try:
            announce_peering(settings.peering)
        except Exception as exc:  # only a log line: never a reason to fail the login
            log.warning(f"Could not tell whether the kopf.dev peering CRDs are installed: {exc}")
    return info


def announce_peering(peering: Any) -> None:
    """Log whether this replica peers with others (one active among several) or acts alone."""
    kind = "ClusterKopfPeering" if peering.clusterwide else "KopfPeering"
    if peering.standalone:
        log.info("Peering is off (--standalone): this replica acts alone")
        return
    with Kube() as kube:
        installed = kube.serves(
            "kopf.dev/v1", "clusterkopfpeerings" if peering.clusterwide else "kopfpeerings"
        )
        missing = installed and peering.clusterwide and not kube.get("kopf.dev/v1", kind, None, peering.name)
    if missing:
        log.warning(
            f"The {kind} {peering.name!r} does not exist, so replicas cannot see each other; create it "
            "(docs/operator.md, Install) or run one replica"
        )
    elif installed:
        log.info(
            f"Peering through {kind} {peering.name!r}: of several replicas the highest priority is active"
        )
    elif peering.mandatory:
        log.warning(
            "Waiting for the kopf.dev peering CRDs (--require-peering): install crds/kopf-peerings.yaml"
        )
    else:
        log.info(
            "No kopf.dev peering CRDs: running standalone (one replica); install crds/kopf-peerings.yaml "
            "to run several"
        )


@kopf.on.create(*_RESOURCE)
@kopf.on.update(*_RESOURCE)
@kopf.on.resume(*_RESOURCE)
def on_change(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    reconcile(body, patch, logger)


@kopf.on.delete(*_RESOURCE)
def on_delete(name: str, namespace: str, logger: kopf.Logger, **_: Any) -> None:
    with Kube() as kube:
        gone = [f"{kind}/{child}" for api_version, kind, child in builders.all_names(name)
                if kube.delete(api_version, kind, namespace, child)]  # fmt: skip
    with _locks_guard:
        _locks.pop((namespace, name), None)
    logger.info(f"Deleted pool {namespace}/{name}: removed {gone}")


@kopf.timer(*_RESOURCE, interval=STATUS_INTERVAL, initial_delay=STATUS_INTERVAL)
def refresh_status(name: str, namespace: str, **_: Any) -> None:
    """Follow rollouts and failures of the children between spec changes."""
    with pool_lock(namespace, name), Kube() as kube:
        new = refresh(kube, namespace, name)
        if new is not None:
            kube.patch_status(*POOL, namespace, name, new)
