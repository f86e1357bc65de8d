"""A lookup service process: the index behind gRPC, the lean query channel (Locate/Scores over
TCP), HTTP (health, metrics, JSON scores) and a lease sweeper."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time

from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.fingerprint import fingerprints
from kvpool.cachenode.core.settings import LookupSettings
from kvpool.cachenode.rpc.proto import lookup_pb2, lookup_pb2_grpc
from kvpool.cachenode.server.grpcserver import bind, display_host, new_grpc_server
from kvpool.cachenode.server.httpserver import HealthServer
from kvpool.cachenode.server.lookup import metrics
from kvpool.cachenode.server.lookup.index import LookupIndex, scores
from kvpool.cachenode.server.lookup.querychannel import QueryChannel
from kvpool.cachenode.server.lookup.service import LookupService, check_scores_request
from kvpool.cachenode.server.node import package_version

log = logging.getLogger(__name__)

SERVICE_NAME = "kvpool.v1.Lookup"
GRPC_WORKERS = 8
WRITER_SLOTS = 4  # worker threads holders may occupy at once; the rest stay free for lookups
GRPC_MESSAGE_LIMIT = 16 * 1024 * 1024


class LookupServer:
    """Binds every port in the constructor (conflicts fail fast); serves after start()."""

    def __init__(self, settings: LookupSettings) -> None:
        settings.validate()
        self.settings = settings
        self.index = LookupIndex(
            settings.holder_lease, settings.effective_rebuild_window, max_holders=settings.max_holders
        )
        self.started_at = time.time()
        self._stopped = threading.Event()
        self._announced_authoritative = False
        self._grpc = new_grpc_server(GRPC_WORKERS, settings.auth_token, GRPC_MESSAGE_LIMIT, "kvpool-lookup")
        service = LookupService(self.index, settings, self.stats, WRITER_SLOTS, hello=self._hello)
        lookup_pb2_grpc.add_LookupServicer_to_server(service, self._grpc)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._grpc)
        self._set_health(self.index.authoritative)
        reflection.enable_server_reflection(
            (
                lookup_pb2.DESCRIPTOR.services_by_name["Lookup"].full_name,
                reflection.SERVICE_NAME,
                health.SERVICE_NAME,
            ),
            self._grpc,
        )
        self.port = bind(self._grpc, settings.host, settings.port, settings.tls)
        self._http = HealthServer(
            settings.host,
            settings.http_port,
            lambda: self.index.authoritative,
            settings.auth_token,
            tls=settings.tls,
            routes={("POST", "/scores"): self._http_scores, ("GET", "/stats"): self._http_stats},
            not_ready="rebuilding the index from the holders' snapshots after a start",
        )
        self.http_port = self._http.port
        self.query_token = secrets.token_bytes(32)  # handed out by Hello, under the bearer token
        self._queries = QueryChannel(
            self.index,
            settings.host,
            settings.query_port,
            token=self.query_token,
            max_query_keys=settings.max_query_keys,
            check_scores=check_scores_request,
            tls=settings.tls,
        )
        self.query_port = self._queries.port
        self._sweeper = threading.Thread(target=self._sweep, name="kvpool-lookup-leases", daemon=True)

    @property
    def url(self) -> str:
        host = self.settings.advertise_host or display_host(self.settings.host)
        return f"{'grpcs' if self.settings.tls else 'grpc'}://{host}:{self.port}"

    def start(self) -> None:
        self._http.start()
        self._queries.start()
        self._grpc.start()
        self._sweeper.start()

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._set_health(False)
        self._grpc.stop(grace).wait(grace + 1)
        self._queries.stop()
        self._http.stop()
        self._sweeper.join(timeout=5)

    def summary(self) -> str:
        window = self.settings.effective_rebuild_window
        return (
            f"kvpool lookup on {self.url} (query channel {self.query_port}, http {self.http_port}): "
            f"holder lease {self.settings.holder_lease:g} s, not authoritative for the first {window:g} s (rebuild window)"
            + (", auth on" if self.settings.auth_token else "")
            + (", TLS on" if self.settings.tls else "")
        )

    def _hello(self) -> lookup_pb2.LookupHelloResponse:
        return lookup_pb2.LookupHelloResponse(
            version=package_version(),
            query_port=self.query_port,
            query_token=self.query_token,
            max_query_keys=self.settings.max_query_keys,
        )

    def stats(self) -> dict:
        index = self.index
        now = time.monotonic()
        holders = index.holders()
        entries = sum(h.entries for h in holders)
        return {
            "service": "lookup",
            "version": package_version(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "ready": index.authoritative,
            "authoritative": index.authoritative,
            "rebuild_window_s": index.rebuild_window_s,
            "holder_lease_s": index.lease_s,
            "query_port": self.query_port,
            "query_connections": self._queries.connections,
            "keys": index.keys,
            "entries": entries,
            "index_bytes": index.nbytes,
            "bytes_per_entry": round(index.nbytes / entries, 2) if entries else None,
            "max_event_lag_s": round(max((h.lag_s for h in holders), default=0.0), 4),
            "pending_events": sum(h.pending for h in holders),
            "rss_bytes": _rss_bytes(),
            "table": index.table_stats(),
            "holders": [
                {
                    "holder_id": h.info.holder_id,
                    "kind": h.info.kind,
                    "tier": h.info.tier,
                    "address": h.info.address,
                    "incarnation": h.incarnation,
                    "entries": h.entries,
                    "last_seq": h.last_seq,
                    "synced": h.synced,
                    "event_lag_s": round(h.lag_s, 4),
                    "pending_events": h.pending,
                    "lease_left_s": round(h.lease_expiry - now, 3),
                    "resyncs": h.resyncs,
                }
                for h in sorted(holders, key=lambda h: h.info.holder_id)
            ],
        }

    # -- HTTP JSON ---------------------------------------------------------------------------
    def _http_scores(self, body: bytes, query: str) -> tuple[int, bytes, str]:
        """POST /scores {"keys": [hex, ...], "tokens_per_key": 256, "kind": "agent"}."""
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise InvalidRequest("the body must be a JSON object")
            keys = request.get("keys")
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise InvalidRequest('"keys" must be a list of hex strings')
            if len(keys) > self.settings.max_query_keys:
                raise InvalidRequest(
                    f"the query has {len(keys)} keys, the limit is {self.settings.max_query_keys}"
                )
            tokens_per_key = request.get("tokens_per_key", 0)
            kind = request.get("kind", "")
            if not isinstance(tokens_per_key, int) or not isinstance(kind, str):
                raise InvalidRequest('"tokens_per_key" must be an integer and "kind" a string')
            check_scores_request(tokens_per_key, kind)
            raw = [_unhex(k) for k in keys]
            size = len(raw[0]) if raw else 32
            if any(len(k) != size for k in raw) or not 1 <= size <= 64:
                raise InvalidRequest("keys must all have one size of 1..64 bytes")
        except (ValueError, InvalidRequest) as exc:  # json.JSONDecodeError is a ValueError
            metrics.ERRORS.labels("invalid").inc()
            return 400, _json({"error": str(exc)}), "application/json"
        located = self.index.locate(fingerprints(b"".join(raw), size))
        ranked = scores(located, tokens_per_key, kind)
        return (
            200,
            _json(
                {
                    "scores": {s.info.holder_id: s.matched_tokens for s in ranked},
                    "holders": [
                        {
                            "holder_id": s.info.holder_id,
                            "kind": s.info.kind,
                            "address": s.info.address,
                            "matched_keys": s.matched_keys,
                            "matched_tokens": s.matched_tokens,
                        }
                        for s in ranked
                    ],
                    "prefix_keys": located.prefix,
                    "authoritative": located.authoritative,
                }
            ),
            "application/json",
        )

    def _http_stats(self, body: bytes, query: str) -> tuple[int, bytes, str]:
        del body, query
        return 200, _json(self.stats()), "application/json"

    # -- leases ------------------------------------------------------------------------------
    def _sweep(self) -> None:
        interval = min(1.0, self.index.lease_s / 4)
        while not self._stopped.wait(interval):
            for gone in self.index.expire():
                metrics.EXPIRED_HOLDERS.inc()
                metrics.DROPPED_ENTRIES.labels("lease").inc(gone.entries)
                log.warning(
                    "holder %s (%s at %s) sent nothing for %.1f s, past its lease of %g s: dropped its %d entries",
                    gone.info.holder_id,
                    gone.info.kind,
                    gone.info.address or "no address",
                    gone.silent_s,
                    self.index.lease_s,
                    gone.entries,
                )
            self._update_gauges()

    def _update_gauges(self) -> None:
        index = self.index
        holders = index.holders()
        for kind in ("agent", "node"):
            metrics.HOLDERS.labels(kind).set(sum(1 for h in holders if h.info.kind == kind))
        metrics.KEYS.set(index.keys)
        metrics.ENTRIES.set(sum(h.entries for h in holders))
        metrics.INDEX_BYTES.set(index.nbytes)
        authoritative = index.authoritative
        metrics.AUTHORITATIVE.set(1 if authoritative else 0)
        if authoritative and not self._announced_authoritative:
            self._announced_authoritative = True
            self._set_health(True)
            log.info(
                "index rebuilt: %d holders, %d keys; answering authoritatively", len(holders), index.keys
            )

    def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self._health.set("", status)
        self._health.set(SERVICE_NAME, status)


def _unhex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise InvalidRequest(f"not a hex key: {text[:80]!r}") from None


def _json(value: dict) -> bytes:
    return json.dumps(value).encode()


def _rss_bytes() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
