"""The scheduler's side of disaggregated prefill (docs/disaggregated.md): a producer's answer
carries an announcement of the chunks it is storing; a request that expects chunks its prefill
engine has not stored yet is held — vLLM is told "not known yet" and asks again next step — and
asked about again every ``announce.POLL_S`` until they are there or ``announced_wait_ms`` passed.

The decisions are announce.py's (pure); this keeps the per-request state, the counters and the log.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from . import announce, metrics

log = logging.getLogger(__name__)


@dataclass
class Awaited:
    """What one request waits for, from its first answer on; ``waiting`` goes False for good when
    the wait ends (a request is never held twice)."""

    expect: int  # chunks
    since: float  # time.monotonic() of the first answer
    announced: bool
    waiting: bool = True
    retry_at: float = 0.0


NOT_WAITING = Awaited(0, 0.0, False, waiting=False)


class PrefillWaits:
    """Per engine: ``load`` and ``save`` say what this engine does; ``consumer`` that its role is
    kv_consumer (every request it serves was prefilled elsewhere)."""

    def __init__(self, bound_ms: float, chunk: int, *, load: bool, save: bool, consumer: bool) -> None:
        self.bound_s = bound_ms / 1000
        self.chunk = chunk
        self.load, self.save, self.consumer = load, save, consumer
        self.unannounced = announce.UnannouncedWaits()

    # -- producer ----------------------------------------------------------------------------------
    def announcement(self, request: Any, keys: list[bytes] | None, chunks: int) -> dict[str, Any] | None:
        """The ``kv_transfer_params`` a finished request answers with: an announcement of its first
        ``chunks`` chunks, from an engine that stores and either never loads (a producer) or was
        asked for one (``do_remote_decode``, as routers mark a prefill request)."""
        if not self.save or not keys:
            return None
        asked = getattr(request, "kv_transfer_params", None) or {}
        if self.load and not (isinstance(asked, dict) and asked.get("do_remote_decode")):
            return None
        ann = announce.announce(keys, chunks)
        return ann.params() if ann is not None else None

    # -- consumer ----------------------------------------------------------------------------------
    def held(self, awaited: Awaited | None) -> bool:
        """Before a new lookup: the request still waits its poll interval (a step counted)."""
        if awaited is None or not awaited.waiting or time.monotonic() >= awaited.retry_at:
            return False
        metrics.STATS.add("pd_wait_steps")
        return True

    def hold(
        self,
        awaited: Awaited | None,
        request: Any,
        keys: list[bytes],
        prompt_tokens: int,
        found: int,
        limit: int,
    ) -> Awaited:
        """After an answer that found ``found`` chunks (no more than ``limit`` may load): the
        request's wait; while ``waiting``, vLLM is told "not known yet" and the answer is dropped."""
        if awaited is not None and not awaited.waiting:
            return awaited
        now = time.monotonic()
        if awaited is None:
            awaited = self._expect(request, keys, prompt_tokens, now, found)
            if not awaited.waiting:
                return awaited
        if announce.keep_waiting(awaited.expect, found, limit, now - awaited.since, self.bound_s):
            awaited.retry_at = now + announce.POLL_S
            metrics.STATS.add("pd_wait_steps")
            return awaited
        awaited.waiting = False
        expected = min(awaited.expect, limit)
        if found < expected:
            metrics.STATS.add("pd_wait_timeouts")
            log.warning(
                "kvpool: request %s: its prefill engine's chunks: %d expected, %d found after %.0f ms; "
                "computing the rest", getattr(request, "request_id", "?"), expected, found, 1000 * (now - awaited.since),
            )  # fmt: skip
            if not awaited.announced and self.unannounced.waited(found):
                log.warning(
                    "kvpool: %d requests in a row found none of their prompt chunks after waiting %.0f ms: the "
                    "prefill engines may key chunks differently (model, chunk size, parallelism); requests without "
                    "an announcement are not waited for until one finds a chunk", self.unannounced.limit,
                    1000 * self.bound_s,
                )  # fmt: skip
        elif expected and not awaited.announced:
            self.unannounced.found()
        return awaited

    def _expect(self, request: Any, keys: list[bytes], prompt_tokens: int, now: float, found: int) -> Awaited:
        if not self.load or self.bound_s <= 0:
            return NOT_WAITING
        ann = announce.read(getattr(request, "kv_transfer_params", None))
        if ann is None and not self.unannounced.on:
            if found and self.consumer:  # the producers' chunks match again
                self.unannounced.found()
            return NOT_WAITING
        expect = announce.expected(ann, keys, prompt_tokens, self.chunk, self.consumer)
        if ann is not None and not expect:
            log.info("kvpool: request %s: its announcement is of other chunk keys (another model, chunk size or "
                     "prompt); not waiting for it", getattr(request, "request_id", "?"))  # fmt: skip
        return Awaited(expect, now, ann is not None) if expect else NOT_WAITING
