"""Running the operator: kopf settings, namespaces, peering and the health endpoint in one place.

Peering (several replicas, one active) is used when asked for (`require_peering`) or when the
kopf.dev peering CRDs are installed; without them the operator runs standalone, so the default
start works with one replica and nothing but the KVCachePool CRD.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
from collections.abc import Sequence
from importlib import metadata
from wsgiref.simple_server import WSGIServer

import kopf
import prometheus_client

from . import handlers  # registers the handlers

DEFAULT_PEERING = "kvpool-operator"


@dataclasses.dataclass(frozen=True)
class WebhookOptions:
    """How `kvpool operator` serves the pod-injection webhook (docs/install.md)."""

    port: int = 9443
    cert_dir: pathlib.Path = pathlib.Path("/tmp/kvpool-webhook")
    dns_names: tuple[str, ...] = ("localhost",)
    config_name: str | None = None
    """MutatingWebhookConfiguration whose caBundle gets the operator's own CA (None: leave it alone)."""
    metrics_port: int | None = 8081
    refresh_s: float = 60.0


def start_webhook(options: WebhookOptions) -> object:
    """Start the webhook server (in its own thread); returns it for `stop()`."""
    import kubernetes.config

    from .webhook import cluster
    from .webhook.server import WebhookServer

    # kopf's login configures the kubernetes client only once kopf runs; the webhook starts first.
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        try:
            kubernetes.config.load_kube_config()
        except (kubernetes.config.ConfigException, OSError) as exc:
            log.warning(f"No Kubernetes credentials for the webhook yet ({exc}); kopf's login will set them")
    return WebhookServer(
        cluster.get_pool,
        port=options.port,
        cert_dir=options.cert_dir,
        dns_names=list(options.dns_names),
        metrics_port=options.metrics_port,
        inject_ca=cluster.ca_injector(options.config_name) if options.config_name else None,
        refresh_s=options.refresh_s,
    ).start()


log = logging.getLogger(__name__)


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
    # How often kopf checks whether a cancelled pool daemon (`maintain_pool`) has exited; the pool
    # itself never waits for it (no finalizer). kopf's default is 60 s.
    s.background.cancellation_polling = 1.0
    s.posting.level = logging.WARNING
    s.execution.max_workers = 8
    return s


def _version() -> str:
    try:
        return metadata.version("kvpool")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def run(
    namespaces: Sequence[str] = (),
    *,
    health_port: int | None = 8080,
    peering_name: str = DEFAULT_PEERING,
    standalone: bool = False,
    require_peering: bool = False,
    priority: int = 0,
    stop_flag: threading.Event | None = None,
    ready_flag: threading.Event | None = None,
    webhook: WebhookOptions | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run until stopped. No namespaces = all namespaces.

    Metrics (`kvpool.operator.metrics`, and the webhook's): the webhook's server serves /metrics on
    its `metrics_port`; without the webhook, `metrics_port` gets a server of its own (None: none).

    Peering: off with `standalone`; with `require_peering` the operator waits until the kopf.dev
    CRDs exist; otherwise kopf detects them and peers through `peering_name` when they are there.
    """
    if standalone and require_peering:
        raise ValueError("standalone and require_peering exclude each other")
    settings = operator_settings()
    settings.peering.name = peering_name  # used when detected, or when required below
    where = f"namespaces {', '.join(namespaces)}" if namespaces else "all namespaces"
    health = f"/healthz on port {health_port}" if health_port else "no health endpoint"
    log.info("kvpool operator %s starting: watching KVCachePools in %s; %s", _version(), where, health)
    handlers.forget_announcement()
    server = start_webhook(webhook) if webhook is not None else None
    metrics_server = start_metrics(metrics_port) if webhook is None and metrics_port is not None else None
    try:
        _run_kopf(settings, namespaces, standalone, require_peering, peering_name, priority, health_port,
                  stop_flag, ready_flag)  # fmt: skip
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()


def start_metrics(port: int, host: str = "0.0.0.0") -> WSGIServer:
    """Serve the process's metrics at http://host:port/metrics (in a thread) when the webhook,
    which serves them otherwise, is off. Port 0 picks a free port (`server.server_port`)."""
    server, _thread = prometheus_client.start_http_server(port, addr=host)
    log.info(f"Metrics on :{server.server_port}/metrics")
    return server


def _run_kopf(settings, namespaces, standalone, require_peering, peering_name, priority, health_port,
              stop_flag, ready_flag) -> None:  # fmt: skip
    kopf.run(
        settings=settings,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=standalone,
        peering_name=peering_name if require_peering else None,
        priority=priority,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
