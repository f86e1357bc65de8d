"""A cache node: the tiered store behind gRPC control, the TCP data channel and HTTP health."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
import uuid
from concurrent import futures
from importlib import metadata

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .auth import BearerTokenInterceptor
from .dataserver import DataServer
from .httpserver import HealthServer
from .proto import kvpool_pb2, kvpool_pb2_grpc
from .service import CacheNodeService
from .settings import MAX_FRAME_SIZE, NodeSettings
from .shared_config import build_shared_tiers
from .sizes import format_size
from .store import TieredStore

log = logging.getLogger("kvpool.node")

SERVICE_NAME = "kvpool.v1.CacheNode"
GRPC_MESSAGE_LIMIT = MAX_FRAME_SIZE + 64 * 1024
GRPC_WORKERS = 32


def package_version() -> str:
    try:
        return metadata.version("kvpool")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_store(settings: NodeSettings) -> TieredStore:
    shared = build_shared_tiers(settings.shared) if settings.shared is not None else []
    return TieredStore(
        settings.memory,
        disk_dir=settings.disk_dir,
        disk_bytes=settings.disk_size,
        shared_tiers=shared,
        high_watermark=settings.high_watermark,
        low_watermark=settings.low_watermark,
    )


class CacheNode:
    """Binds every port in the constructor (so conflicts fail fast), serves after start()."""

    def __init__(self, settings: NodeSettings) -> None:
        settings.validate()
        self.settings = settings
        self.node_id = settings.node_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.version = package_version()
        self.data_token = secrets.token_bytes(32)
        self.max_request_bytes = max(settings.max_value_size, settings.memory)
        self.started_at = time.time()
        self.store = build_store(settings)
        self._ready = threading.Event()
        self._stopped = threading.Event()

        token = settings.auth_token
        interceptors = [BearerTokenInterceptor(token)] if token else []
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS, thread_name_prefix="kvpool-grpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
                ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
                ("grpc.so_reuseport", 0),
            ],
        )
        kvpool_pb2_grpc.add_CacheNodeServicer_to_server(CacheNodeService(self), self._grpc)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (
                kvpool_pb2.DESCRIPTOR.services_by_name["CacheNode"].full_name,
                reflection.SERVICE_NAME,
                health.SERVICE_NAME,
            ),
            self._grpc,
        )
        address = f"{_grpc_host(settings.host)}:{settings.port}"
        if settings.tls is not None:
            credentials = grpc.ssl_server_credentials([(settings.tls.key_pem, settings.tls.cert_pem)])
            self.port = self._grpc.add_secure_port(address, credentials)
        else:
            self.port = self._grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC port {settings.port} on {settings.host}")
        self._data = DataServer(
            self.store,
            settings.host,
            settings.data_port,
            token=self.data_token,
            max_value_size=settings.max_value_size,
            max_batch_keys=settings.max_batch_keys,
            max_request_bytes=self.max_request_bytes,
            tls=settings.tls.context if settings.tls else None,
        )
        self.data_port = self._data.port
        self._http = HealthServer(
            settings.host,
            settings.http_port,
            self._ready.is_set,
            token,
            tls=settings.tls.context if settings.tls else None,
        )
        self.http_port = self._http.port

    @property
    def url(self) -> str:
        host = self.settings.advertise_host or _display_host(self.settings.host)
        scheme = "grpcs" if self.settings.tls else "grpc"
        return f"{scheme}://{host}:{self.port}"

    def start(self, wait_ready: bool = True) -> None:
        """Serve health at once; serve data once the disk index is rebuilt."""
        self._http.start()
        self._grpc.start()
        self._data.start()
        loader = threading.Thread(target=self._load, name="kvpool-index", daemon=True)
        loader.start()
        if wait_ready:
            loader.join()

    def _load(self) -> None:
        started = time.perf_counter()
        self.store.start()
        self._ready.set()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("node %s ready in %.2f s", self.node_id, time.perf_counter() - started)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def summary(self) -> str:
        disk = (
            f"disk {format_size(self.settings.disk_size)} at {self.settings.disk_dir}"
            if self.settings.disk_dir
            else "no disk tier"
        )
        return (
            f"kvpool node {self.node_id} on {self.url} (data port {self.data_port}, http {self.http_port}): "
            f"memory {format_size(self.settings.memory)}, {disk}"
            + (
                f", shared tiers {', '.join(self.settings.shared.enabled)}"
                if self.settings.shared and self.settings.shared.enabled
                else ""
            )
            + (", auth on" if self.settings.auth_token else "")
            + (", TLS on" if self.settings.tls else "")
        )

    def stats(self) -> dict:
        return {
            "node_id": self.node_id,
            "version": self.version,
            "uptime_s": round(time.time() - self.started_at, 3),
            **self.store.stats(),  # includes "ready"
        }

    def stop(self, grace: float = 2.0) -> None:
        """Stop accepting, finish in-flight calls, flush pending disk writes."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._grpc.stop(grace).wait(grace + 1)
        self._data.stop()
        self._http.stop()
        self.store.close()

    def wait(self) -> None:
        self._grpc.wait_for_termination()

    def _set_health(self, status) -> None:
        self._health.set("", status)
        self._health.set(SERVICE_NAME, status)


def _grpc_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
