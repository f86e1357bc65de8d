"""How long the scheduler waits for a pool lookup inside vLLM's ``get_num_new_matched_tokens``.

A lookup runs in a lookup thread (connector/scheduler.py): hashing the request's keys once, then
one batched call to the pool. Waiting for it costs every running request that much of a
scheduling step; not waiting costs the new request a whole step (vLLM is told "not known yet" and
skips it). A healthy pool answers in well under a millisecond, so the scheduler waits for it —
but no longer than the pool's recent answers say it should take:

    wait = min(cap, max(FLOOR_S, MARGIN x p90 of recent lookup times) + MARGIN x hashing estimate)

where a lookup's time is measured from submitting it to its answer (thread hand-off included),
less the hashing, and the hashing estimate is the request's tokens times the recent median
per-token hashing cost. ``cap`` is the ``lookup_wait_ms`` setting. No wait at all:

* while a lookup the scheduler already gave up on is still unanswered: the pool is stalled now,
  and waiting again for every new request would stall the scheduler once per request;
* while the pool's typical (median) lookup takes longer than ``cap``: waiting would be in vain;
* while the pool is skipped (its breaker open): it would answer a miss anyway, so the scheduler
  answers one at once and the lookup thread only hashes the keys (``ConnectorScheduler._lookup``).

Pure logic; thread-safe (lookup threads report answers, the scheduler thread asks budgets).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

FLOOR_S = 0.001
"""The least a lookup is waited for: a thread wake-up in a busy engine process (other threads
holding the GIL) can take a good part of a millisecond even when the pool is fast."""
MARGIN = 2.0
"""How far past the recent p90 a lookup may run before it is given up on for this step."""
WINDOW = 64
"""Recent lookups the figures come from: a few seconds of a busy engine's new requests."""
WARM_UP = 4
"""Until this many lookups answered, wait up to the cap: the first one opens the connection."""


@dataclass
class Ask:
    """One lookup in flight: when it was submitted and whether the scheduler gave up waiting."""

    submitted: float  # time.perf_counter() at submission
    future: Any = None  # concurrent.futures.Future of the lookup
    overdue: bool = False
    done: bool = False


class LookupWait:
    """The scheduler's wait budget for a lookup, learnt from the pool's recent answers."""

    def __init__(self, cap_s: float, floor_s: float = FLOOR_S, margin: float = MARGIN) -> None:
        self.cap_s = max(0.0, cap_s)
        self.floor_s = min(floor_s, self.cap_s)
        self.margin = margin
        self._lock = threading.Lock()
        self._times: deque[float] = deque(maxlen=WINDOW)  # submit → answer, less the hashing
        self._rates: deque[float] = deque(maxlen=WINDOW)  # hashing seconds per token
        self._hash_per_token = 0.0  # their median
        self._overdue = 0  # lookups given up on and still unanswered
        self._p90 = self._p50 = 0.0

    def budget(self, tokens_to_hash: int = 0) -> float:
        """Seconds to wait for a lookup submitted now that still has ``tokens_to_hash`` to key."""
        with self._lock:
            if self.cap_s <= 0 or self._overdue:
                return 0.0
            if len(self._times) < WARM_UP:  # little known yet (the first lookups connect)
                return self.cap_s
            if self._p50 > self.cap_s:
                return 0.0
            wait = max(self.floor_s, self.margin * self._p90)
            wait += self.margin * self._hash_per_token * tokens_to_hash
            return min(self.cap_s, wait)

    def gave_up(self, ask: Ask) -> None:
        """The scheduler stopped waiting for ``ask`` (it answered "not known yet")."""
        with self._lock:
            if not ask.done and not ask.overdue:
                ask.overdue = True
                self._overdue += 1

    def answered(
        self, ask: Ask, now: float, hash_s: float = 0.0, tokens: int = 0, asked_pool: bool = True
    ) -> None:
        """``ask`` answered at ``now`` (perf_counter), ``hash_s`` of it spent keying ``tokens``;
        ``asked_pool`` False: no pool call was needed (its time says nothing about the pool).
        Called in the lookup thread once per ask, whatever the answer."""
        with self._lock:
            if ask.done:
                return
            ask.done = True
            if ask.overdue:
                self._overdue -= 1
            if tokens > 0 and hash_s > 0:
                self._rates.append(hash_s / tokens)
                self._hash_per_token = sorted(self._rates)[len(self._rates) // 2]
            if not asked_pool:
                return
            self._times.append(max(0.0, now - ask.submitted - hash_s))
            ordered = sorted(self._times)
            self._p50 = ordered[len(ordered) // 2]
            self._p90 = ordered[min(len(ordered) - 1, (len(ordered) * 9) // 10)]

    def figures(self) -> dict[str, float]:
        """What the budget is built from, in ms (for `kvpool bench ttft` and logs)."""
        with self._lock:
            return {
                "lookup_p50_ms": 1000 * self._p50,
                "lookup_p90_ms": 1000 * self._p90,
                "hash_us_per_token": 1e6 * self._hash_per_token,
                "samples": float(len(self._times)),
            }
