"""What the scheduler side knows of one request: its keys, its pool answer and lease, and how far
its chunks are computed, confirmed and stored.

The three marks only move forward together (saved ≤ confirmed ≤ recorded) except on a failure,
which moves them back to the first chunk that may hold KV computed over a failed load: nothing
past it is stored until vLLM recomputes it. Pure state: no pool, no engine.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from .lookup_wait import Ask
from .pd_wait import Awaited


@dataclass
class RequestState:
    # rank → keys of every full prompt chunk; None until the first lookup (in a lookup thread,
    # off the scheduler's) has hashed them
    keys: dict[int, list[bytes]] | None
    prompt_tokens: int
    refused: str | None = None
    refused_feature: str | None = None  # a miss_reasons "refused" detail
    pool_chunks: int = 0  # leading chunks the pool held at the last lookup
    unreachable: str | None = None  # why the last lookup got no answer (None: it answered)
    # the first chunk whose load failed: never loaded again for this request, and no lookup goes
    # past it (a fresh lookup would find the same chunk and the request would load it forever)
    load_limit: int | None = None
    pinned: int = 0  # interleaved keys the lookup's lease pinned
    lease: tuple[int, float] | None = None  # (lease id, local expiry) of the last lookup
    lookup: Ask | None = None  # a lookup not yet answered (or answered, not yet read)
    asked_at: float = 0.0  # time.monotonic() when the last answer was asked
    # an answer that loads nothing (a miss, or no more than vLLM has itself) is trusted until then
    # (time.monotonic()); afterwards it is asked again in the background and stands meanwhile
    nothing_until: float | None = None
    keys_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    load: tuple[int, int] | None = None  # token range to load this step
    saved_upto: int = 0  # chunks [0, saved_upto) are in the pool or were sent to be stored
    confirmed_upto: int = 0  # chunks computed in steps whose outputs showed no failed load
    recorded_upto: int = 0  # chunks computed by a scheduled step (confirmed or not)
    pending: deque[tuple[int, int]] = field(default_factory=deque)  # (step, chunks up to) unconfirmed
    finished: bool = False  # vLLM finished it and keeps its blocks until we release them
    counted: bool = False
    local: int = 0  # tokens vLLM had itself when it last asked (its prefix cache)
    classified: bool = False  # its miss reasons are counted (once, when vLLM first schedules it)
    sent_load: tuple[int, int] | None = None  # tokens the workers were told to load: failures count there
    missed: dict[str, int] = field(default_factory=dict)  # its miss reasons (label → tokens), for the log
    pd: Awaited | None = None  # its wait for chunks its prefill engine is storing (pd_wait.py)
    saving: bool = False  # saves were issued: blocks stay until the workers copied them out
    loading: bool = False  # a background load is in flight (vLLM frees its blocks after it)

    def found_in_pool(
        self, chunks: int, pinned: int, lease: tuple[int, float] | None, unreachable: str | None = None
    ) -> None:
        """A lookup's answer (``unreachable``: why there was none): what the pool holds is never
        stored again."""
        self.pool_chunks, self.pinned, self.lease = chunks, pinned, lease
        self.unreachable = unreachable
        self.saved_upto = max(self.saved_upto, chunks)
        self.confirmed_upto = max(self.confirmed_upto, self.saved_upto)
        self.recorded_upto = max(self.recorded_upto, self.confirmed_upto)

    def record(self, step: int, done: int) -> None:
        """Chunks [0, done) are computed once ``step`` ran; stored only after it is confirmed."""
        if done > self.recorded_upto:
            self.pending.append((step, done))
            self.recorded_upto = done

    def confirm(self, step: int) -> None:
        """Every worker's output up to ``step`` showed no failed load for this request."""
        while self.pending and self.pending[0][0] <= step:
            self.confirmed_upto = self.pending.popleft()[1]

    def roll_back(self, chunk: int) -> int:
        """Chunks from ``chunk`` on, and whatever was computed in steps not yet confirmed, are not
        stored; vLLM recomputes them and they are stored then. Returns the chunks given up."""
        unsaved = self.recorded_upto - self.confirmed_upto
        self.pending.clear()
        self.saved_upto = min(self.saved_upto, chunk)
        self.confirmed_upto = min(self.confirmed_upto, chunk)
        self.recorded_upto = self.confirmed_upto
        self.pool_chunks = min(self.pool_chunks, chunk)
        return unsaved

    def preempted(self) -> None:
        """Its blocks are gone: what it computed but did not store yet is recomputed or reloaded."""
        self.pending.clear()
        self.confirmed_upto = self.recorded_upto = self.saved_upto
        self.load = None
