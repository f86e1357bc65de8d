"""The operator's only door to the API server: get, apply, delete children by (apiVersion, kind).

One small generic client instead of the typed per-kind APIs, so that the RBAC test can list every
call the operator makes from one table (`PLURALS`), and so that applying any child is one code path.
Applies use server-side apply with a fixed field manager; an object that already holds every desired
field is left alone, so reconciling twice sends no writes.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from . import sizing
from .naming import GROUP as POOL_GROUP
from .naming import MANAGER, PLURAL, VERSION

APPLIED_HASH = "kvpool.io/applied-hash"
"""Digest of the last applied body: a field dropped from the spec changes it, so the apply is resent."""

PLURALS: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Service"): "services",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("apps/v1", "Deployment"): "deployments",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitors",
    (f"{POOL_GROUP}/{VERSION}", "KVCachePool"): PLURAL,
    ("kopf.dev/v1", "ClusterKopfPeering"): "clusterkopfpeerings",
    ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration"): "mutatingwebhookconfigurations",
}


def api_error(exc: ApiException) -> str:
    """The API server's own words for a refusal: status code, reason and message."""
    try:
        message = json.loads(exc.body or "{}").get("message") or ""
    except (ValueError, AttributeError):
        message = str(exc.body or "")
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def namespace_terminating(exc: ApiException) -> bool:
    """A refusal because the namespace is being deleted: everything in it goes, nothing to repair."""
    try:
        details = json.loads(exc.body or "{}").get("details") or {}
    except (ValueError, AttributeError):
        return False
    return exc.status == 403 and any(
        c.get("reason") == "NamespaceTerminating" for c in details.get("causes") or []
    )


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """The URL of a kind (namespace None: a cluster-scoped kind)."""
    prefix = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace is not None else ""
    out = f"{prefix}{scope}/{PLURALS[(api_version, kind)]}"
    return f"{out}/{name}" if name else out


QUANTITY_FIELDS = frozenset({"requests", "limits", "sizeLimit"})
"""Keys whose value (or whose map's values) the API server stores as canonical quantities:
container and claim `resources.requests`/`limits`, `emptyDir.sizeLimit`."""


def contains(actual: Any, desired: Any, quantities: bool = False) -> bool:
    """Whether `actual` already holds every field of `desired` (server defaults may add more).

    Under `QUANTITY_FIELDS` values count as equal when they are the same quantity (`10240Mi` is
    stored as `10Gi`); elsewhere strings must match, since `"1"` and `"1.0"` in an env var or a
    ConfigMap are different values to the program that reads them. An empty map or list counts as
    held when the field is absent: the API server stores none (`annotations: {}` comes back absent)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            contains(actual[k], v, quantities or k in QUANTITY_FIELDS) if k in actual else v in ({}, [])
            for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d, quantities) for a, d in zip(actual, desired, strict=True))
        )
    if actual == desired or str(actual) == str(desired):
        return True
    return quantities and sizing.same_quantity(actual, desired)


def holds(current: dict[str, Any] | None, obj: dict[str, Any]) -> bool:
    """Whether `current` (as read from the API server) needs no write to become `obj`."""
    return current is not None and contains(current, stamped(obj))


def stamped(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with the digest of its body in an annotation (`APPLIED_HASH`)."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    meta = {**obj["metadata"]}
    meta["annotations"] = {**meta.get("annotations", {}), APPLIED_HASH: digest}
    return {**obj, "metadata": meta}


UNREAD: Any = object()
"""`Kube.apply(current=UNREAD)`: read the object first."""


class Kube:
    """A thin client on the kubernetes library's default configuration (set by kopf's login)."""

    def __init__(self, api: kubernetes.client.ApiClient | None = None) -> None:
        self.api = api or kubernetes.client.ApiClient()

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> Kube:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, url: str, body: Any = None, query: list[tuple[str, str]] | None = None,
              content_type: str = "application/json") -> Any:  # fmt: skip
        request = self.api.param_serialize(
            method=method,
            resource_path=url,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(
                http_resp=response, body=response.data.decode(errors="replace"), data=None
            )
        raw = response.data
        return json.loads(raw) if raw else None

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", path(api_version, kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, obj: dict[str, Any], current: dict[str, Any] | None = UNREAD) -> str:
        """Create or update `obj`; returns 'created', 'updated' or 'unchanged'. `current`: the
        object as just read (None: absent), so a pass that already read it does not read it again."""
        obj = stamped(obj)
        meta = obj["metadata"]
        api_version, kind = obj["apiVersion"], obj["kind"]
        if current is UNREAD:
            current = self.get(api_version, kind, meta["namespace"], meta["name"])
        if current is not None and contains(current, obj):
            return "unchanged"
        url = path(api_version, kind, meta["namespace"], meta["name"])
        query = [("fieldManager", MANAGER), ("force", "true")]
        try:
            # Creation is an apply too: fields created by a POST would belong to an Update-operation
            # entry of our manager, and a later apply that drops such a field would not remove it.
            self._call("PATCH", url, obj, query, content_type="application/apply-patch+yaml")
        except ApiException as exc:
            if exc.status != 404 or current is not None:
                raise
            # Servers without apply-creates (kmock's emulator): create, then apply as usual.
            self._call("POST", path(api_version, kind, meta["namespace"]), obj, [("fieldManager", MANAGER)])
        return "created" if current is None else "updated"

    def patch_status(
        self, api_version: str, kind: str, namespace: str, name: str, new: dict[str, Any]
    ) -> None:
        """Merge `new` into the object's status (the status subresource)."""
        url = path(api_version, kind, namespace, name) + "/status"
        self._call("PATCH", url, {"status": new}, content_type="application/merge-patch+json")

    def merge_patch(
        self, api_version: str, kind: str, namespace: str | None, name: str, body: dict[str, Any]
    ) -> None:
        """A JSON merge patch (RFC 7386): lists in `body` replace the object's lists whole."""
        self._call(
            "PATCH",
            path(api_version, kind, namespace, name),
            body,
            content_type="application/merge-patch+json",
        )

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete if present; True when something was deleted."""
        try:
            self._call(
                "DELETE", path(api_version, kind, namespace, name), {"propagationPolicy": "Background"}
            )
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def serves(self, api_version: str, plural: str) -> bool:
        """Whether the cluster serves a resource (e.g. ServiceMonitor only where Prometheus-operator runs)."""
        try:
            listing = self._call("GET", f"/apis/{api_version}")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return any(r.get("name") == plural for r in (listing or {}).get("resources", []))
