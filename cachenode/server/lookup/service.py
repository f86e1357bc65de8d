"""The gRPC servicer of the lookup service: checks requests, calls the index, logs and counts."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from kvpool.cachenode.core.errors import HolderLimit, InvalidRequest, Unavailable
from kvpool.cachenode.core.holders import HolderInfo, Status, Verdict
from kvpool.cachenode.core.settings import MAX_TOKENS_PER_KEY, LookupSettings
from kvpool.cachenode.rpc import lookup_wire as wire
from kvpool.cachenode.rpc.proto import lookup_pb2 as pb
from kvpool.cachenode.rpc.proto import lookup_pb2_grpc as pb_grpc
from kvpool.cachenode.rpc.status import abort
from kvpool.cachenode.server.lookup import metrics
from kvpool.cachenode.server.lookup.index import LookupIndex, scores

log = logging.getLogger(__name__)

_STATUS = {
    Status.OK: pb.LookupPublishResponse.OK,
    Status.DUPLICATE: pb.LookupPublishResponse.DUPLICATE,
    Status.RESYNC: pb.LookupPublishResponse.RESYNC,
}
_OPS = ("publish", "resync", "heartbeat", "stats")
_REQUESTS = {op: metrics.REQUESTS.labels(op) for op in _OPS}
_LATENCY = {op: metrics.LATENCY.labels(op) for op in _OPS}
_ADMITS, _EVICTS = metrics.EVENTS.labels("admit"), metrics.EVENTS.labels("evict")


class LookupService(pb_grpc.LookupServicer):
    """Writers (publish, resync, heartbeat) may occupy at most `writer_slots` of the server's worker
    threads at once; the others stay free for lookups, which never wait for the writers' lock."""

    def __init__(
        self,
        index: LookupIndex,
        settings: LookupSettings,
        stats: Callable[[], dict],
        writer_slots: int,
        hello: Callable[[], pb.LookupHelloResponse] = pb.LookupHelloResponse,
    ) -> None:
        """`hello`: what Hello answers (the query channel's port and session token)."""
        self.index = index
        self.settings = settings
        self._stats = stats
        self._holder_messages: dict[HolderInfo, pb.LookupHolder] = {}
        self._writer_slots = threading.BoundedSemaphore(writer_slots)
        self._hello = hello

    # -- readers ---------------------------------------------------------------------------
    def Locate(self, request: pb.LookupLocateRequest, context) -> pb.LookupLocateResponse:
        started = time.perf_counter()
        fps = self._query(request.keys, context)
        located = self.index.locate(fps)
        response = pb.LookupLocateResponse(
            prefix=located.prefix,
            authoritative=located.authoritative,
            holders=[
                pb.LookupHolderMatch(holder=self._holder(m.info), run=m.run, bitmap=m.bitmap)
                for m in located.holders
            ],
        )
        metrics.query_done("locate", started, len(fps), located.prefix)
        return response

    def Scores(self, request: pb.LookupScoresRequest, context) -> pb.LookupScoresResponse:
        started = time.perf_counter()
        tokens_per_key = request.tokens_per_key
        try:
            check_scores_request(tokens_per_key, request.kind)
        except InvalidRequest as exc:
            self._reject(context, exc)
        fps = self._query(request.keys, context)
        located = self.index.locate(fps)
        response = pb.LookupScoresResponse(
            prefix=located.prefix,
            authoritative=located.authoritative,
            scores=[
                pb.LookupScore(
                    holder_id=s.info.holder_id,
                    kind=s.info.kind,
                    address=s.info.address,
                    tier=s.info.tier,
                    matched_keys=s.matched_keys,
                    matched_tokens=s.matched_tokens,
                )
                for s in scores(located, tokens_per_key, request.kind)
            ],
        )
        metrics.query_done("scores", started, len(fps), located.prefix)
        return response

    def Hello(self, request: pb.LookupHelloRequest, context) -> pb.LookupHelloResponse:
        return self._hello()

    def Stats(self, request: pb.LookupStatsRequest, context) -> pb.LookupStatsResponse:
        _REQUESTS["stats"].inc()
        return pb.LookupStatsResponse(json=json.dumps(self._stats()))

    # -- holders -------------------------------------------------------------------------------
    def Publish(self, request: pb.LookupPublishRequest, context) -> pb.LookupPublishResponse:
        with self._writer_slot(context):
            return self._publish(request, context)

    def Resync(self, request_iterator, context) -> pb.LookupPublishResponse:
        with self._writer_slot(context):
            return self._resync(request_iterator, context)

    def Heartbeat(self, request: pb.LookupHeartbeatRequest, context) -> pb.LookupPublishResponse:
        with self._writer_slot(context):
            return self._heartbeat(request, context)

    def _publish(self, request: pb.LookupPublishRequest, context) -> pb.LookupPublishResponse:
        started = time.perf_counter()
        limit = self.settings.max_batch_events
        try:
            holder_id = wire.check_holder_id(request.holder_id)
            total = sum(wire.key_count(b) for b in itertools.chain(request.admitted, request.evicted))
            if total > limit:
                raise InvalidRequest(f"the batch has {total} events, the limit is {limit}")
            admitted = wire.block_fingerprints(request.admitted, limit, "the batch")
            evicted = wire.block_fingerprints(request.evicted, limit, "the batch")
            age = _check_age(request.oldest_event_age_s)
        except InvalidRequest as exc:
            self._reject(context, exc)
        verdict = self.index.publish(
            holder_id, request.incarnation, request.seq, admitted, evicted, age, request.pending
        )
        self._account(holder_id, verdict)
        if verdict.status is Status.OK:
            _ADMITS.inc(len(admitted))
            _EVICTS.inc(len(evicted))
            metrics.EVENT_LAG.observe(age)
        metrics.BATCHES.labels(verdict.status.value).inc()
        _LATENCY["publish"].observe(time.perf_counter() - started)
        _REQUESTS["publish"].inc()
        return self._reply(verdict)

    def _resync(self, request_iterator, context) -> pb.LookupPublishResponse:
        started = time.perf_counter()
        limit = self.settings.max_snapshot_keys
        try:
            first = next(request_iterator, None)
            if first is None:
                raise InvalidRequest("a resync stream needs at least one frame naming the holder")
            info = wire.holder_info(first.holder)
            parts: list[np.ndarray] = []
            total, pending = 0, first.pending
            for frame in itertools.chain([first], request_iterator):
                if frame is not first and frame.HasField("holder"):
                    raise InvalidRequest("only the first resync frame may name the holder")
                total += sum(wire.key_count(b) for b in frame.keys)
                if total > limit:
                    raise InvalidRequest(f"the snapshot has more than {limit} keys (--max-snapshot-keys)")
                parts.append(wire.block_fingerprints(frame.keys, limit, "the snapshot"))
                pending = frame.pending
        except InvalidRequest as exc:
            self._reject(context, exc)
        fps = np.concatenate(parts) if len(parts) > 1 else parts[0]
        try:
            verdict = self.index.resync(info, first.incarnation, first.seq, fps, pending)
        except HolderLimit as exc:
            metrics.ERRORS.labels("holder_limit").inc()
            log.warning("refused holder %s: %s (--max-holders)", info.holder_id, exc)
            abort(context, exc, f"{exc} (--max-holders)")
        self._account(info.holder_id, verdict)
        if verdict.status is Status.OK:
            metrics.RESYNCS.inc()
            log.info(
                "resync from %s %s (%s, %s): %d keys as of seq %d in %.1f ms",
                info.kind,
                info.holder_id,
                info.tier,
                info.address or "no address",
                len(fps),
                first.seq,
                (time.perf_counter() - started) * 1e3,
            )
        _LATENCY["resync"].observe(time.perf_counter() - started)
        _REQUESTS["resync"].inc()
        return self._reply(verdict)

    def _heartbeat(self, request: pb.LookupHeartbeatRequest, context) -> pb.LookupPublishResponse:
        try:
            holder_id = wire.check_holder_id(request.holder_id)
        except InvalidRequest as exc:
            self._reject(context, exc)
        verdict = self.index.heartbeat(holder_id, request.incarnation, request.seq, request.pending)
        self._account(holder_id, verdict)
        _REQUESTS["heartbeat"].inc()
        return self._reply(verdict)

    # -- helpers -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _writer_slot(self, context):
        if not self._writer_slots.acquire(blocking=False):
            metrics.ERRORS.labels("busy").inc()
            abort(context, Unavailable("busy applying other holders' events; retry shortly"))
        try:
            yield
        finally:
            self._writer_slots.release()

    def _query(self, keys: pb.LookupKeys, context) -> np.ndarray:
        try:
            return wire.block_fingerprints([keys], self.settings.max_query_keys, "the query")
        except InvalidRequest as exc:
            self._reject(context, exc)

    def _holder(self, info: HolderInfo) -> pb.LookupHolder:
        message = self._holder_messages.get(info)
        if message is None:
            if len(self._holder_messages) > 4096:
                self._holder_messages.clear()
            message = self._holder_messages[info] = wire.holder_message(info)
        return message

    def _reply(self, verdict: Verdict) -> pb.LookupPublishResponse:
        return pb.LookupPublishResponse(
            status=_STATUS[verdict.status],
            reason=verdict.reason,
            last_seq=verdict.last_seq,
            lease_s=self.index.lease_s,
            authoritative=self.index.authoritative,
        )

    def _account(self, holder_id: str, verdict: Verdict) -> None:
        if verdict.dropped:
            metrics.DROPPED_ENTRIES.labels(verdict.drop_reason).inc(verdict.dropped)
            if verdict.drop_reason == "incarnation":
                log.warning(
                    "holder %s restarted (new incarnation): dropped its %d entries",
                    holder_id,
                    verdict.dropped,
                )
            else:
                log.info(
                    "holder %s resynced: %d entries it no longer holds removed", holder_id, verdict.dropped
                )
        if verdict.status is Status.RESYNC:
            metrics.RESYNC_REQUESTS.labels(verdict.code).inc()
            log.info("asked holder %s to resync: %s", holder_id, verdict.reason)

    @staticmethod
    def _reject(context, exc: InvalidRequest):
        metrics.ERRORS.labels("invalid").inc()
        abort(context, exc)


def check_scores_request(tokens_per_key: int, kind: str) -> None:
    if not 1 <= tokens_per_key <= MAX_TOKENS_PER_KEY:
        raise InvalidRequest(f"tokens_per_key must be 1..{MAX_TOKENS_PER_KEY}, got {tokens_per_key}")
    if kind not in ("", "agent", "node"):
        raise InvalidRequest(f"kind must be agent, node or empty, got {kind!r}")


def _check_age(age: float) -> float:
    if not 0 <= age < 86400:  # also rejects NaN
        raise InvalidRequest(f"oldest_event_age_s must be 0..86400, got {age}")
    return age
