"""Running the operator: kopf settings, namespaces, peering and the health endpoint in one place."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import kopf

from . import handlers  # registers the handlers  # noqa: F401

DEFAULT_PEERING = "kvpool-operator"


def operator_settings() -> kopf.OperatorSettings:
    """kopf settings: our own annotation prefix and finalizer, no namespace scanning."""
    s = kopf.OperatorSettings()
    s.persistence.finalizer = "kvpool.io/operator"
    s.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvpool.io")
    s.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvpool.io", key="last-handled-configuration"
    )
    # Namespaces are given exactly (or all of them): listing namespaces to match globs is not needed,
    # which also keeps the operator's RBAC free of cluster-wide namespace reads.
    s.scanning.disabled = True
    s.posting.level = logging.WARNING
    s.execution.max_workers = 8
    return s


def run(
    namespaces: Sequence[str] = (),
    *,
    health_port: int | None = 8080,
    peering_name: str = DEFAULT_PEERING,
    standalone: bool = False,
    priority: int = 0,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
) -> None:
    """Run until stopped. No namespaces = all namespaces. Replicas elect an active one by peering."""
    kopf.run(
        settings=operator_settings(),
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=standalone,
        peering_name=None if standalone else peering_name,
        priority=priority,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
