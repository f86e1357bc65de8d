"""The pod-injection webhook server inside `kvpool operator`: HTTPS, `/mutate-pods`, AdmissionReview v1.

aiohttp (kopf's own HTTP library) on an event loop in its own thread, so the webhook answers while
kopf is busy reconciling. Every path fails open: whatever goes wrong, the pod is admitted (with a
`kvpool.io/skip-reason` when the pod could be read), never refused. The decision itself is the pure
`patch.admit`; here are only the HTTP, the pool lookup, the certificates and the metrics.

Certificates (`certs`) are checked every `refresh_s`: a changed file (cert-manager rotated its
Secret) is loaded into the live TLS context, and the operator's own certificate is renewed before
it expires; when the operator signs its own, it keeps its CA in the caBundle of the
MutatingWebhookConfiguration `config_name` (a `helm upgrade` that resets the bundle is repaired).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import pathlib
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

from . import certs, patch

PATH = "/mutate-pods"
log = logging.getLogger(__name__)

ADMISSIONS = Counter(
    "kvpool_webhook_admissions", "Pods the webhook admitted, by outcome", ["outcome"]
)  # injected, skipped, unchanged, error
ADMISSION_SECONDS = Histogram("kvpool_webhook_admission_seconds", "Time to answer one AdmissionReview")
CERT_EXPIRY = Gauge(
    "kvpool_webhook_certificate_expiry_timestamp_seconds", "When the serving certificate expires"
)

PoolGetter = Callable[[str, str], "dict[str, Any] | None"]


def review_response(review: dict[str, Any], decision: patch.Decision | None) -> dict[str, Any]:
    """The AdmissionReview answer: always allowed; the JSON Patch when there is one."""
    request = review.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    if decision is not None and decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(decision.patch).encode()).decode()
    return {"apiVersion": review.get("apiVersion", "admission.k8s.io/v1"), "kind": "AdmissionReview",
            "response": response}  # fmt: skip


def decide(review: dict[str, Any], get_pool: PoolGetter) -> patch.Decision | None:
    """The decision for one review (None: not a pod, nothing to say). May raise; the caller fails open."""
    request = review.get("request") or {}
    if (request.get("kind") or {}).get("kind") != "Pod" or request.get("operation", "CREATE") != "CREATE":
        return None
    pod = request.get("object")
    if not isinstance(pod, dict):  # nothing a patch could apply to (the API server sends a pod)
        return None
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    if patch.INJECTED_ANNOTATION in patch.annotations(pod):
        return patch.Decision([])
    try:
        pool_ns, pool_name = patch.pool_reference(pod, namespace)
    except patch.Skip as exc:
        return patch.skipped(pod, str(exc))
    try:
        pool = get_pool(pool_ns, pool_name)
    except Exception as exc:  # the API server is down, RBAC, ...: admit, say why
        log.warning(f"Could not read KVCachePool {pool_ns}/{pool_name}: {exc}")
        return patch.skipped(pod, f"could not read KVCachePool {pool_ns}/{pool_name}: {type(exc).__name__}")
    return patch.admit(pod, namespace, pool)


class WebhookServer:
    """Serves `/mutate-pods` (and `/healthz`, `/readyz`) over HTTPS; `/metrics` over HTTP on its own port."""

    def __init__(
        self,
        get_pool: PoolGetter,
        *,
        port: int = 9443,
        host: str = "0.0.0.0",
        cert_dir: pathlib.Path,
        dns_names: list[str],
        metrics_port: int | None = None,
        inject_ca: Callable[[bytes], None] | None = None,
        refresh_s: float = 60.0,
    ) -> None:
        self.get_pool = get_pool
        self.host, self.port, self.metrics_port = host, port, metrics_port
        self.cert_dir = cert_dir
        self.dns_names = dns_names
        self.inject_ca = inject_ca
        self.refresh_s = refresh_s
        self._ssl: ssl.SSLContext | None = None
        self._mtimes: tuple[float, float] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None

    # -- certificates ---------------------------------------------------------------------------
    def _refresh_certificates(self) -> None:
        status = certs.ensure(self.cert_dir, self.dns_names)
        CERT_EXPIRY.set(status.not_after.timestamp())
        if status.generated:
            log.info(f"Webhook certificate for {', '.join(self.dns_names)} written to {self.cert_dir} "
                     f"(valid until {status.not_after:%Y-%m-%d})")  # fmt: skip
        files = (self.cert_dir / certs.CERT, self.cert_dir / certs.KEY)
        mtimes = (files[0].stat().st_mtime, files[1].stat().st_mtime)
        if self._ssl is None:
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        if mtimes != self._mtimes:
            self._ssl.load_cert_chain(*files)  # new handshakes use the new certificate
            if self._mtimes is not None:
                log.info("Webhook certificate reloaded")
            self._mtimes = mtimes
        if status.own and self.inject_ca is not None:
            try:
                self.inject_ca((self.cert_dir / certs.CA_CERT).read_bytes())
            except Exception as exc:
                log.warning(f"Could not put the webhook CA into the webhook configuration's caBundle: {exc}")

    async def _refresh_loop(self) -> None:
        assert self._stop is not None
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.refresh_s)
            except TimeoutError:
                try:
                    await asyncio.to_thread(self._refresh_certificates)
                except Exception as exc:
                    log.error(f"Webhook certificate check failed: {exc}")

    # -- HTTP -------------------------------------------------------------------------------------
    async def _mutate(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        try:
            review = await request.json()
            if not isinstance(review, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            ADMISSIONS.labels("error").inc()
            return web.json_response({"error": f"expected an AdmissionReview: {exc}"}, status=400)
        try:
            decision = await asyncio.to_thread(decide, review, self.get_pool)
            outcome = "unchanged" if decision is None or not (decision.injected or decision.reason) else (
                "injected" if decision.injected else "skipped")  # fmt: skip
            if decision is not None and decision.reason:
                log.info(f"Pod {_pod_name(review)} not injected: {decision.reason}")
            elif decision is not None and decision.injected:
                log.info(f"Pod {_pod_name(review)} injected")
        except Exception as exc:  # fail open: admit, say why when possible
            log.exception(f"Webhook error on pod {_pod_name(review)}; admitting it unchanged")
            outcome = "error"
            try:
                pod = (review.get("request") or {}).get("object")
                decision = (
                    patch.skipped(pod, f"webhook error: {type(exc).__name__}: {exc}"[:500])
                    if isinstance(pod, dict)
                    else None
                )
            except Exception:
                decision = None
        ADMISSIONS.labels(outcome).inc()
        ADMISSION_SECONDS.observe(time.monotonic() - started)
        return web.json_response(review_response(review, decision))

    async def _ok(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application(client_max_size=4 << 20)
        app.add_routes(
            [web.post(PATH, self._mutate), web.get("/healthz", self._ok), web.get("/readyz", self._ok)]
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        metrics_runner = None
        if self.metrics_port is not None:
            metrics_app = web.Application()
            metrics_app.add_routes([web.get("/metrics", self._metrics), web.get("/healthz", self._ok)])
            metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await metrics_runner.setup()
            metrics_site = web.TCPSite(metrics_runner, self.host, self.metrics_port)
            await metrics_site.start()
            self.metrics_port = metrics_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info(f"Webhook serving https://{self.host}:{self.port}{PATH}"
                 + (f"; metrics on :{self.metrics_port}/metrics" if metrics_runner else ""))  # fmt: skip
        self._started.set()
        try:
            await self._refresh_loop()
        finally:
            await runner.cleanup()
            if metrics_runner is not None:
                await metrics_runner.cleanup()

    def _run(self) -> None:
        try:
            self._refresh_certificates()
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:
            self._error = exc
            self._started.set()
        finally:
            if self._loop is not None:
                self._loop.close()

    def start(self, timeout: float = 30.0) -> WebhookServer:
        """Start serving in a thread; returns once listening (raises what kept it from listening)."""
        self._thread = threading.Thread(target=self._run, name="kvpool-webhook", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the webhook server did not start")
        if self._error is not None:
            raise RuntimeError(f"webhook server could not start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)


def _pod_name(review: dict[str, Any]) -> str:
    """namespace/name for log lines (`generateName*` before the name exists); never raises."""
    try:
        request = review.get("request") or {}
        meta = (request.get("object") or {}).get("metadata") or {}
        name = meta.get("name") or (meta.get("generateName", "") + "*")
        return f"{request.get('namespace', '?')}/{name}"
    except Exception:
        return "?"
