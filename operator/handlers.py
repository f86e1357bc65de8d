"""kopf handlers: every KVCachePool ends in the same idempotent steps, `observe` then apply.

Create, update and resume run `reconcile`: render the full set of children and apply it (unchanged
children get no write). Between changes a daemon per pool (`maintain_pool`, every STATUS_INTERVAL)
runs `refresh`: it repairs children that were deleted or edited by someone else, and refreshes the
status from the same reads. An invalid spec only updates the status, so running nodes keep serving
the last good configuration.

No finalizer: children carry owner references, so the garbage collector removes them with the pool,
and deleting a pool (or its namespace, or `helm uninstall`) never waits for the operator. kopf gives
every daemon a finalizer; ours stops itself instead when its pool is gone (`on_event` sees the
DELETED event; a write first re-reads the pool). kopf removes the finalizer that older versions
added (`kvpool.io/operator`) the first time it sees such a pool, since no handler requires one.

kopf runs the daemon beside the change handlers, not after them. So that a status never claims a
generation whose children were not applied yet, and a repair never writes an older spec over a
newer one, the two take a per-pool lock, and the daemon acts only on a pool that a change handler
has handled in this process and whose status already reports its generation; anything else is left
to the change handler. The daemon reads kopf's live body of the pool (kopf refreshes it on every
watch event, before the change handler runs): a body that lags the API server shows the previous
generation, whose children are the ones in place, so a pass on it writes nothing that the change
handler will not bring forward.

Cost of a pass on an unchanged pool: one GET per desired child (7 with the defaults: ConfigMap,
headless, client and lookup Services, StatefulSet, lookup Deployment, PodDisruptionBudget; one more
each for a NetworkPolicy and a ServiceMonitor, plus a discovery GET with the ServiceMonitor on), no
GET of the pool and no write. The StatefulSet and Deployment reads serve the status as well. A
repair adds one GET of the pool (still there, same generation?) and the writes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from . import builders, events, metrics, naming, nodestats, scrape, settings, status
from .builders import statefulset
from .kube import Kube, api_error, contains, holds, namespace_terminating

STATUS_INTERVAL = float(os.environ.get("KVPOOL_STATUS_INTERVAL", "10"))
"""Seconds between repair and status passes over each pool (rollouts report progress this often)."""

_RESOURCE = (naming.GROUP, naming.VERSION, naming.PLURAL)
TERMINATING = "namespace terminating"
"""The outcome of a child the API server refused because its namespace is being deleted."""
POOL = (naming.API_VERSION, naming.KIND)

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
_handled: set[str] = set()
"""Pools (by uid) a change handler has handled in this process: the daemon waits for them."""
_gone: set[str] = set()
"""Pools (by uid) whose DELETED event arrived: their daemons end."""


def _key(pool: Mapping[str, Any]) -> str:
    meta = pool.get("metadata") or {}
    return meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"


@contextmanager
def pool_lock(pool: Mapping[str, Any]) -> Iterator[None]:
    """Serialises the handlers of one pool (kopf runs sync handlers in a thread pool). Keyed by uid:
    a pool deleted and created again under the same name is another pool."""
    with _locks_guard:
        lock = _locks.setdefault(_key(pool), threading.Lock())
    with lock:
        yield


def _forget(key: str) -> None:
    with _locks_guard:
        _locks.pop(key, None)
    _handled.discard(key)
    _gone.discard(key)
    events.forget(key)


def plain(value: Any) -> Any:
    """kopf's read-only body views as plain dicts and lists, for the pure builders."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@dataclasses.dataclass
class Observed:
    """A pool's effective settings (or why its spec is invalid), its children as rendered and as read."""

    settings: settings.PoolSettings | None
    error: str | None
    desired: list[dict[str, Any]]
    current: list[dict[str, Any] | None]
    sts: dict[str, Any] | None
    lookup: dict[str, Any] | None
    monitors_missing: bool = False


def _read_workloads(
    kube: Kube, name: str, namespace: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    sts = kube.get("apps/v1", "StatefulSet", namespace, naming.statefulset_name(name))
    lookup = kube.get("apps/v1", "Deployment", namespace, naming.lookup_name(name))
    return sts, lookup


def _find(objs: list[dict[str, Any]], values: list[Any], kind: str) -> tuple[dict[str, Any] | None, Any]:
    """The rendered object of `kind` and its counterpart in `values` (None, None when not rendered)."""
    for obj, value in zip(objs, values, strict=True):
        if obj["kind"] == kind:
            return obj, value
    return None, None


def observe(kube: Kube, pool: dict[str, Any]) -> Observed:
    """Render the pool's children and read each once; the reads serve the repair and the status."""
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]
    try:
        s = settings.parse(name, namespace, settings.effective_spec(pool))
        builders.check(s)
    except settings.InvalidSpec as exc:
        return Observed(None, str(exc), [], [], *_read_workloads(kube, name, namespace))
    monitors = s.service_monitor and kube.serves("monitoring.coreos.com/v1", "servicemonitors")
    desired = builders.desired(pool, s, monitors)
    current = [kube.get(o["apiVersion"], o["kind"], namespace, o["metadata"]["name"]) for o in desired]
    want_sts, sts = _find(desired, current, "StatefulSet")
    _, lookup = _find(desired, current, "Deployment")
    missing = bool(s.service_monitor and not monitors)
    conflict = statefulset.immutable_change(sts, want_sts) if want_sts else None
    if conflict:
        return Observed(None, conflict, [], [], sts, lookup, missing)
    return Observed(s, None, desired, current, sts, lookup, missing)


def apply_children(
    kube: Kube, observed: Observed, only_stale: bool = False
) -> tuple[dict[str, str], list[str]]:
    """Apply the rendered children over what was read; (outcome per child, refusals)."""
    outcome: dict[str, str] = {}
    refused: list[str] = []
    for obj, current in zip(observed.desired, observed.current, strict=True):
        child = f"{obj['kind']}/{obj['metadata']['name']}"
        if only_stale and holds(current, obj):
            continue
        try:
            outcome[child] = kube.apply(obj, current)
        except ApiException as exc:
            if namespace_terminating(exc):
                outcome[child] = TERMINATING
                continue
            outcome[child] = "refused"
            refused.append(f"the API server refused {child}: {api_error(exc)}")
    return outcome, refused


def image_to_pin(running: dict[str, Any] | None, adopt_running: bool) -> str:
    """The image to pin on a pool without `spec.image`: on resume, what its StatefulSet already runs
    (a pool from an operator version that did not pin keeps its nodes), else the operator's default."""
    if adopt_running and running is not None:
        for c in ((running.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or []:
            if c.get("name") == "node" and c.get("image"):
                return str(c["image"])
    return settings.DEFAULT_IMAGE


def pin_image(kube: Kube, pool: dict[str, Any], adopt_running: bool) -> None:
    """Record the image of a pool without `spec.image` on the pool (settings.PINNED_IMAGE), in
    `pool` and on the server, before any child is rendered with it."""
    if (pool.get("spec") or {}).get("image") or settings.pinned_image(pool):
        return
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]
    running = (
        kube.get("apps/v1", "StatefulSet", namespace, naming.statefulset_name(name))
        if adopt_running
        else None
    )
    image = image_to_pin(running, adopt_running)
    kube.merge_patch(*POOL, namespace, name, {"metadata": {"annotations": {settings.PINNED_IMAGE: image}}})
    pool["metadata"].setdefault("annotations", {})[settings.PINNED_IMAGE] = image
    log.info(f"Pinned {namespace}/{name} to image {image}")


def _set_status(body: dict[str, Any], patch: kopf.Patch, new: dict[str, Any]) -> None:
    events.status_written(_key(body), body, new)
    if not contains(body.get("status") or {}, new):
        patch.status.update(new)


def _fresh_workloads(kube: Kube, observed: Observed, outcome: dict[str, str], name: str, namespace: str
                     ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:  # fmt: skip
    """The workloads for the status: the reads of `observe`, again only for those just written."""
    sts_key = f"StatefulSet/{naming.statefulset_name(name)}"
    lookup_key = f"Deployment/{naming.lookup_name(name)}"
    sts, lookup = observed.sts, observed.lookup
    if outcome.get(sts_key, "unchanged") != "unchanged":
        sts = kube.get("apps/v1", "StatefulSet", namespace, naming.statefulset_name(name))
    if outcome.get(lookup_key, "unchanged") != "unchanged":
        lookup = kube.get("apps/v1", "Deployment", namespace, naming.lookup_name(name))
    return sts, lookup


def reconcile(
    body: Mapping[str, Any],
    patch: kopf.Patch,
    logger: Any,
    reason: str = "update",
    result: metrics.Outcome | None = None,
) -> dict[str, str]:
    """Bring the pool's children to its spec; returns what happened to each child (and says how it
    went in `result`, for the reconcile metrics)."""
    result = result or metrics.Outcome()
    pool = plain(body)
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]
    with pool_lock(pool), Kube() as kube:
        pin_image(kube, pool, adopt_running=reason == "resume")
        _handled.add(_key(pool))
        observed = observe(kube, pool)
        s, error = observed.settings, observed.error
        if s is None:
            logger.error(f"Spec of {namespace}/{name} is invalid, children left as they are: {error}")
            kopf.warn(body, reason="InvalidSpec", message=str(error))
            _set_status(pool, patch, status.compute(pool, None, error, observed.sts, observed.lookup))
            result.value = "invalid"
            return {}
        if observed.monitors_missing:
            logger.warning(
                "spec.metrics.serviceMonitor is on but the cluster has no ServiceMonitor kind; skipped"
            )
        outcome, refused = apply_children(kube, observed)
        if refused:
            # In the status (Degraded, reason ApplyFailed), not only in the log; kopf retries.
            sts, lookup = _fresh_workloads(kube, observed, outcome, name, namespace)
            kube.patch_status(
                *POOL, namespace, name, status.compute(pool, s, None, sts, lookup, refused="; ".join(refused))
            )
            result.value = "refused"
            raise kopf.TemporaryError("; ".join(refused), delay=30)
        if outcome.get(f"StatefulSet/{naming.statefulset_name(name)}") == "updated":
            events.post(
                pool,
                events.change_events(
                    observed.sts, _find(observed.desired, observed.current, "StatefulSet")[0]
                ),
            )
        for api_version, kind, child in builders.unwanted(s):
            # Look first: a reconcile of an unchanged pool sends no writes at all.
            if kube.get(api_version, kind, namespace, child) and kube.delete(
                api_version, kind, namespace, child
            ):
                outcome[f"{kind}/{child}"] = "deleted"
        sts, lookup = _fresh_workloads(kube, observed, outcome, name, namespace)
        _set_status(pool, patch, status.compute(pool, s, None, sts, lookup))
    changed = {k: v for k, v in outcome.items() if v != "unchanged"}
    logger.info(f"Reconciled {namespace}/{name}: {changed or 'no changes'}")
    result.value = "applied" if changed else "unchanged"
    return outcome


def _same_pool(fresh: dict[str, Any] | None, key: str) -> bool:
    """Whether the pool just read is still the one a daemon serves (not gone, not being deleted)."""
    return fresh is not None and _key(fresh) == key and not fresh["metadata"].get("deletionTimestamp")


def _in_flight(pool: dict[str, Any]) -> bool:
    """A spec change the change handler has not reported yet (or a pool it has not handled yet)."""
    generation = (pool.get("metadata") or {}).get("generation")
    reported = (pool.get("status") or {}).get("observedGeneration")
    return _key(pool) not in _handled or generation != reported


def refresh(
    kube: Kube,
    pool: dict[str, Any],
    logger: Any = log,
    stats: dict[str, nodestats.NodeStats | None] | None = None,
    result: metrics.Outcome | None = None,
) -> bool:
    """One pass between spec changes: repair drifted or missing children, then the status (with
    the hit ratio and usage from `stats`, the nodes' figures `scrape.read` got; None: not read).
    False when the pool is gone (its daemon ends). `result` says how it went, for the metrics."""
    result = result or metrics.Outcome()
    key, name, namespace = _key(pool), pool["metadata"]["name"], pool["metadata"]["namespace"]
    result.value = "gone"
    if key in _gone:
        return False
    result.value = "skipped"
    if _in_flight(pool):
        return True
    if not (pool.get("spec") or {}).get("image") and not settings.pinned_image(pool):
        # The pin may be missing from a body that lags the change handler's write: ask the server.
        fresh = kube.get(*POOL, namespace, name)
        if not _same_pool(fresh, key):
            result.value = "gone"
            return False
        pool = fresh  # type: ignore[assignment]
        if _in_flight(pool):
            return True
        pin_image(kube, pool, adopt_running=False)
    observed = observe(kube, pool)
    refused: list[str] = []
    result.value = "unchanged" if observed.settings is not None else "invalid"
    if observed.settings is not None and not all(map(holds, observed.current, observed.desired)):
        fresh = kube.get(*POOL, namespace, name)
        if not _same_pool(fresh, key):
            result.value = "gone"
            return False
        result.value = "skipped"
        if _in_flight(fresh):  # type: ignore[arg-type]
            return True
        outcome, refused = apply_children(kube, observed, only_stale=True)
        if TERMINATING in outcome.values():
            # The namespace controller is deleting the children and then the pool: not drift.
            logger.info(f"Namespace {namespace} is being deleted: children of {name} are not repaired")
            return True
        result.value = "refused" if refused else "repaired"
        logger.warning(f"Repaired children of {namespace}/{name} changed or deleted by others: {outcome}")
        if refused:
            logger.error("; ".join(refused))
    new = status.compute(
        pool,
        observed.settings,
        observed.error,
        observed.sts,
        observed.lookup,
        refused="; ".join(refused) or None,
    )
    if stats is not None and observed.settings is not None:
        new.update(nodestats.aggregate(list(stats.values())))
        events.stats_read(key, pool, stats)
    events.status_written(key, pool, new)
    if not contains(pool.get("status") or {}, new):
        kube.patch_status(*POOL, namespace, name, new)
    return True


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
def on_change(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, reason: str, **_: Any) -> None:
    with metrics.reconciling(str(reason)) as result:  # kopf's Reason is a str enum: "resume" == RESUME
        reconcile(body, patch, logger, reason=reason, result=result)


@kopf.on.event(*_RESOURCE)
async def on_event(type: str, body: kopf.Body, **_: Any) -> None:
    """A deleted pool's daemon ends (kopf stops daemons by itself only behind a finalizer)."""
    if type == "DELETED":
        _gone.add(_key(body))


def _without_finalizer(fn: Callable[..., Any]) -> Callable[..., Any]:
    """kopf (1.45) gives every daemon and timer a finalizer so it can stop them before the object
    goes; `maintain_pool` stops itself, and a finalizer would keep pools Terminating while the
    operator is down. No public switch exists: the registered handler is replaced (pyproject keeps
    kopf below 1.46; tests/operator_ checks that no handler asks for a finalizer)."""
    spawning = kopf.get_default_registry()._spawning
    spawning._handlers = [
        dataclasses.replace(h, requires_finalizer=False) if h.fn is fn else h for h in spawning._handlers
    ]
    return fn


def _read_stats(pool: dict[str, Any]) -> dict[str, nodestats.NodeStats | None] | None:
    """The pool's nodes' figures, read before the pass takes the pool's lock (reads time out
    slowly; a change handler must not wait for them). None: not read (see `scrape.read`)."""
    if _key(pool) in _gone or _in_flight(pool):
        return None
    try:
        s = settings.parse(
            pool["metadata"]["name"], pool["metadata"]["namespace"], settings.effective_spec(pool)
        )
        return scrape.read(s)
    except settings.InvalidSpec:
        return None


def _pass(body: kopf.Body, logger: Any) -> bool:
    pool = plain(body)
    with metrics.reconciling("pass") as result:
        stats = _read_stats(pool)
        with pool_lock(pool), Kube() as kube:
            return refresh(kube, pool, logger, stats=stats, result=result)


async def _sleep(stopped: kopf.DaemonStopped, seconds: float) -> bool:
    """Sleep unless stopped; False once stopped. Not kopf's `initial_delay` nor `stopped.wait()`:
    both wait in `asyncio.wait_for`, which Python 3.11 turns into a TimeoutError when kopf cancels
    it at exit as its timeout fires, and kopf's run then ends with that error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not stopped and (left := deadline - loop.time()) > 0:
        await asyncio.sleep(min(left, 0.5))
    return not stopped


@_without_finalizer
@kopf.daemon(*_RESOURCE, cancellation_backoff=10, cancellation_timeout=30)
async def maintain_pool(body: kopf.Body, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any) -> None:
    """Every STATUS_INTERVAL: repair children, follow rollouts and failures (see `refresh`). Asked to
    stop (operator exit, peering pause), it ends after the pass in progress."""
    while await _sleep(stopped, STATUS_INTERVAL):
        try:
            alive = await asyncio.to_thread(_pass, body, logger)
        except Exception as exc:  # an API hiccup: try again next interval
            logger.warning(f"Status and repair pass failed: {exc}")
            alive = True
        if not alive:
            _forget(_key(body))  # only when gone: a daemon paused by peering comes back
            return
