"""Circuit breaker: stop paying timeouts to something that is down or slow (a shared tier, a peer,
a pool member, the connector's pool).

Pure logic with an injectable clock, so every transition is tested without sleeping.

closed     every call is allowed; `failure_threshold` consecutive failures open the breaker.
open       calls are refused (the caller treats them as misses / keeps writes queued) until
           `reset_timeout` has passed since the breaker opened.
half_open  exactly one probe call is allowed; its success closes the breaker, its failure opens
           it again. A probe that never reports back (its caller died) is given up after
           `reset_timeout`, and another probe is allowed.

Why consecutive failures rather than an error rate: a shared tier either answers or it does not;
one success means the path works again, and a short run of failures is the cheapest signal that
it does not. Each reopening doubles the wait (capped) so a long outage costs few probes.

Failures may be counted by kind of call (`record_failure("get")`): a pool whose lookups answer
but whose reads keep timing out must still open the breaker, so a success of one kind resets only
that kind's run. Without a kind, every call counts as one kind.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum


class State(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Gauge values for the breaker-state metric.
STATE_VALUE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 3,
        reset_timeout: float = 1.0,
        max_reset_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout <= 0 or max_reset_timeout < reset_timeout:
            raise ValueError("need 0 < reset_timeout <= max_reset_timeout")
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.max_reset_timeout = max_reset_timeout
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = State.CLOSED
        self._failures: dict[str, int] = {}  # kind of call -> consecutive failures
        self._opened_at = 0.0
        self._wait = reset_timeout
        self._probe_started: float | None = None

    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    def allow(self) -> bool:
        """May a call go to the tier now? In half-open state this hands out the single probe."""
        with self._lock:
            now = self._clock()
            if self._state is State.CLOSED:
                return True
            if self._state is State.OPEN:
                if now - self._opened_at < self._wait:
                    return False
                self._set(State.HALF_OPEN)
                self._probe_started = now
                return True
            # HALF_OPEN: one probe at a time; a lost probe expires.
            if self._probe_started is not None and now - self._probe_started < self._wait:
                return False
            self._probe_started = now
            return True

    def retry_in(self) -> float:
        """Seconds until `allow()` could return True (0 when it could now); does not change state."""
        with self._lock:
            now = self._clock()
            if self._state is State.CLOSED:
                return 0.0
            start = self._opened_at if self._state is State.OPEN else (self._probe_started or now)
            return max(0.0, start + self._wait - now)

    def record_success(self, kind: str = "") -> None:
        with self._lock:
            self._failures.pop(kind, None)
            self._probe_started = None
            self._wait = self.reset_timeout
            if self._state is not State.CLOSED:
                self._set(State.CLOSED)

    def record_failure(self, kind: str = "") -> bool:
        """Count a failure; True when it opened a closed breaker (a new outage, not a failed probe)."""
        with self._lock:
            now = self._clock()
            if self._state is State.HALF_OPEN:
                self._wait = min(self._wait * 2, self.max_reset_timeout)
                self._open(now)
                return False
            if self._state is State.OPEN:
                return False  # a call that started before the breaker opened; nothing new learned
            self._failures[kind] = self._failures.get(kind, 0) + 1
            if self._failures[kind] >= self.failure_threshold:
                self._open(now)
                return True
            return False

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._probe_started = None
        self._failures.clear()
        self._set(State.OPEN)

    def _set(self, state: State) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
