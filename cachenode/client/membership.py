"""What a pool client knows of the pool's members, kept fresh by a background thread.

The members are learnt from any node the client was given (its seeds) and merged from every
answer (members.py). Members that fail are marked down by a circuit breaker (core/breaker.py):
their keys go to the next node in rendezvous order at once, and the thread probes them
(half-open) until they answer again; the list itself is refreshed every few seconds and after
errors. Nodes also report the view before their last change, remembered for the handoff window,
and the members they count as ready: a member some node does not count yet is "unsettled", and
reads of keys it ranks high for also ask the next nodes in rendezvous order (routing.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from kvpool.cachenode.client import members as ms
from kvpool.cachenode.client.buffers import BufferPool
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.routing import Member, Routing, Views
from kvpool.cachenode.core.breaker import CircuitBreaker, State
from kvpool.cachenode.core.errors import (
    InvalidRequest,
    KVPoolError,
    NodeLeaving,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

log = logging.getLogger(__name__)

SEED_GRACE_S = 0.25  # after the first seed answers, how long the others get to answer too
MIN_REFRESH_GAP_S = 0.5  # refreshes triggered by errors come at most this often
PROBE_TIMEOUT_S = 2.0
BREAKER_RESET_S = 1.0
BREAKER_MAX_RESET_S = 10.0


class Membership:
    """Thread-safe. `ensure()` learns the members on first use and starts the refresh thread."""

    def __init__(
        self,
        url: str,
        seeds: list[tuple[str, int]],
        options: ConnectOptions,
        buffers: Callable[[], BufferPool],
        *,
        replicas_wanted: int,
        refresh_interval: float,
        handoff_window: float,
        fallback_nodes: int = 0,
    ) -> None:
        self.url = url
        self.seeds = seeds
        self._options = options
        self._buffers = buffers
        self._replicas_wanted = replicas_wanted
        self._pool_replicas = 1
        self._refresh_interval = refresh_interval
        self._views = Views(handoff_window)
        self._fallback_nodes = fallback_nodes
        self._unsettled: frozenset[str] = frozenset()
        self._lock = threading.Lock()  # guards _members, _conns
        self._bootstrap_lock = threading.Lock()
        self._members: dict[str, Member] = {}
        self._conns: dict[tuple[str, int], NodeConnection] = {}
        self._retired: list[tuple[NodeConnection, float]] = []  # closed a while after replacement
        self._refresher: threading.Thread | None = None
        self._wake = threading.Event()
        self._closed = False
        self._last_refresh = 0.0

    @property
    def members(self) -> dict[str, Member]:
        """The members as last learnt (possibly none yet)."""
        return self._members

    @property
    def replication_factor(self) -> int:
        return self._replicas_wanted or self._pool_replicas

    def stop(self) -> None:
        """End the refresh thread (waiting for it up to the timeout)."""
        self._closed = True
        self._wake.set()
        if self._refresher is not None and self._refresher is not threading.current_thread():
            self._refresher.join(timeout=self._options.timeout)

    def close_connections(self) -> None:
        with self._lock:
            conns = [*self._conns.values(), *(c for c, _ in self._retired)]
            self._conns.clear()
            self._retired.clear()
            self._members = {}
        for conn in conns:
            conn.close()

    def routing(self, require_writable: bool = True) -> Routing:
        """One request's picture of the pool; Unavailable when no member can take it."""
        members = self.ensure()
        placed = tuple(sorted(n for n, m in members.items() if m.info.state in ms.PLACED_STATES and m.up))
        readable = frozenset(n for n, m in members.items() if m.info.state in ms.READABLE_STATES and m.up)
        if not readable or (require_writable and not placed):
            self.wake()
            states = ", ".join(f"{n} {m.summary()['state']}" for n, m in sorted(members.items()))
            raise Unavailable(f"no member of {self.url} is reachable ({states})")
        current = self._views.observe(placed)
        return Routing(
            members,
            current,
            readable,
            self._views.previous(),
            self.replication_factor,
            self._unsettled,
            self._fallback_nodes,
        )

    def set_seeds(self, url: str, seeds: list[tuple[str, int]]) -> None:
        """Learn the members from other nodes from now on (a node was added to the list); the
        view before stays an earlier view for the handoff window."""
        with self._lock:
            self.url, self.seeds = url, seeds
        if self._members:
            self._refresh(raise_errors=True)

    def failed(self, member: Member, exc: Exception) -> None:
        """A call to `member` was Unavailable: mark it down (or leaving) and refresh soon."""
        if isinstance(exc, NodeLeaving):  # still serves reads: place new keys elsewhere, keep reading
            member.info = member.info.with_state(ms.LEAVING)
        else:
            member.breaker.record_failure()
            log.debug("pool member %s failed: %s", member.info.node_id, exc)
        self.wake()

    def ensure(self) -> dict[str, Member]:
        members = self._members
        if members:
            return members
        if self._closed:
            raise Unavailable("client is closed")
        with self._bootstrap_lock:
            if not self._members:
                self._refresh(raise_errors=True)
        if self._refresher is None:
            with self._lock:
                if self._refresher is None and not self._closed:
                    self._refresher = threading.Thread(
                        target=self._refresh_loop, name="kvpool-client-members", daemon=True
                    )
                    self._refresher.start()
        return self._members

    def _conn(self, address: tuple[str, int]) -> NodeConnection:
        conn = self._conns.get(address)
        if conn is None:
            conn = self._conns[address] = NodeConnection(address[0], address[1], self._options, self._buffers)
        return conn

    def _refresh(self, *, raise_errors: bool = False) -> bool:
        """Ask the seeds (else the known members) who the members are; merge their answers."""
        self._last_refresh = time.monotonic()
        with self._lock:
            targets = [self._conn(a) for a in self.seeds]
        reports, errors = self._ask(targets)
        if not reports:
            with self._lock:
                known = [m.conn for m in self._members.values() if m.up and m.conn not in targets]
            more, more_errors = self._ask(known[:3])
            reports, errors = more, errors + more_errors
        if not reports:
            if raise_errors:
                for kind in (Unauthenticated, InvalidRequest):
                    error = next((e for e in errors if isinstance(e, kind)), None)
                    if error is not None:
                        raise error
                raise Unavailable(f"no node of {self.url} answered: " + "; ".join(map(str, errors)))
            return False
        self._apply(reports)
        return True

    def _ask(self, conns: list[NodeConnection]) -> tuple[list[ms.Report], list[KVPoolError]]:
        """Members from each connection at once; returns once all answered, or the first
        answered and SEED_GRACE_S passed (a dead seed costs the others nothing)."""
        reports: list[ms.Report] = []
        errors: list[KVPoolError] = []
        done = threading.Condition()
        pending = []
        for conn in conns:
            try:
                call = conn.members_async(timeout=min(self._options.timeout, PROBE_TIMEOUT_S * 2))
            except KVPoolError as exc:
                errors.append(exc)
                continue
            pending.append((conn, call))

            def notify() -> None:
                with done:
                    done.notify_all()

            call.add_done_callback(notify)
        deadline = time.monotonic() + self._options.timeout
        first_answer: float | None = None
        while True:
            with done:
                finished = [p for p in pending if p[1].done()]
                if len(finished) == len(pending):
                    break
                if first_answer is None and any(_succeeded(c) for _, c in finished):
                    first_answer = time.monotonic()
                limit = deadline if first_answer is None else min(deadline, first_answer + SEED_GRACE_S)
                left = limit - time.monotonic()
                if left <= 0:
                    break
                done.wait(left)
        for conn, call in pending:
            if not call.done():
                continue
            try:
                reports.append(ms.Report.from_pb(call.result(), conn.host))
            except Unimplemented:
                try:  # a node without Members (an older node, an agent): a member on its own
                    hello = conn.hello()
                    info = ms.MemberInfo(hello.node_id or conn.url, conn.host, conn.port, hello.data_port)
                    reports.append(ms.Report(info))
                except KVPoolError as exc:
                    errors.append(exc)
            except KVPoolError as exc:
                errors.append(exc)
        return reports, errors

    def _apply(self, reports: list[ms.Report]) -> None:
        merged = ms.merge(reports)
        answered = {r.node.node_id for r in reports}
        replicas = next((r.replication_factor for r in reports if r.replication_factor), 0)
        if replicas:
            self._pool_replicas = replicas
        for report in reports:
            if report.previous:
                self._views.remember(report.previous, report.changed_s_ago)
        self._unsettled = ms.unsettled(reports)
        now = time.monotonic()
        with self._lock:
            members: dict[str, Member] = {}
            for node, info in merged.items():
                members[node] = self._member(self._members.get(node), info, now)
                if node in answered:
                    members[node].breaker.record_success()
            used = {m.conn.address for m in members.values()} | set(self.seeds)
            for address in [a for a in self._conns if a not in used]:
                self._retire(address, now)
            self._members = members
            # calls still using a retired connection get time to finish before it closes
            old_enough = [c for c, t in self._retired if now - t > 2 * self._options.timeout]
            self._retired = [(c, t) for c, t in self._retired if now - t <= 2 * self._options.timeout]
        for conn in old_enough:
            conn.close()

    def _member(self, old: Member | None, info: ms.MemberInfo, now: float) -> Member:
        """The member as `info` describes it (under self._lock)."""
        breaker = old.breaker if old is not None else self._breaker(info.node_id)
        if old is not None and old.info.incarnation and old.info.incarnation != info.incarnation:
            # it restarted: a new channel (the old one may sit in gRPC's reconnect back-off),
            # a new data port and session token, and a fresh chance
            self._retire(info.address, now)
            breaker = self._breaker(info.node_id)
        return Member(info, self._conn(info.address), breaker)

    def _retire(self, address: tuple[str, int], now: float) -> None:
        conn = self._conns.pop(address, None)
        if conn is not None:
            self._retired.append((conn, now))

    def _breaker(self, node: str) -> CircuitBreaker:
        def on_change(state: State) -> None:
            if state is State.OPEN:
                log.warning("pool member %s is down; its keys go to the next node in rendezvous order", node)
            elif state is State.CLOSED:
                log.info("pool member %s is back", node)

        return CircuitBreaker(
            failure_threshold=1,
            reset_timeout=BREAKER_RESET_S,
            max_reset_timeout=BREAKER_MAX_RESET_S,
            on_change=on_change,
        )

    def wake(self) -> None:
        self._wake.set()

    def _refresh_loop(self) -> None:
        """Refresh the members every refresh_interval (sooner after errors) and probe members
        whose breaker is open once their wait is over (the half-open probe)."""
        while not self._closed:
            now = time.monotonic()
            due = self._last_refresh + self._refresh_interval - now
            waits = [m.breaker.retry_in() for m in self._members.values() if not m.up]
            self._wake.wait(max(0.05, min([due, *waits])))
            if self._closed:
                return
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                self._probe_down_members()
                since = time.monotonic() - self._last_refresh
                if since >= self._refresh_interval or (woken and since >= MIN_REFRESH_GAP_S):
                    self._refresh()
            except Exception:  # never let the thread die: routing depends on it
                log.exception("refreshing the members of %s failed", self.url)

    def _probe_down_members(self) -> None:
        for member in list(self._members.values()):
            if member.up or not member.breaker.allow():
                continue
            try:
                reply = member.conn.members(timeout=min(self._options.timeout, PROBE_TIMEOUT_S))
            except KVPoolError:
                member.breaker.record_failure()
                continue
            # it answers: believe what it says about itself (it may have restarted, and may still
            # be rebuilding its disk index) before any request goes to it
            info = ms.MemberInfo.from_pb(reply.node, member.conn.host)
            node = member.info.node_id
            if info.node_id == node:
                with self._lock:
                    current = self._members.get(node)
                    if current is not None:
                        fresh = self._member(current, info, time.monotonic())
                        self._members = {**self._members, node: fresh}
                        fresh.breaker.record_success()
            self._wake.set()  # and learn the rest at the next refresh


def _succeeded(call) -> bool:
    try:
        call.result()
    except KVPoolError:
        return False
    return True


def wanted_replicas(value: int | None) -> int:
    """0 means "what the pool says"."""
    if value is None:
        text = os.environ.get("KVPOOL_REPLICATION_FACTOR", "").strip()
        if not text:
            return 0
        try:
            value = int(text)
        except ValueError:
            raise InvalidRequest(f"KVPOOL_REPLICATION_FACTOR must be an integer, got {text!r}") from None
    if value < 1:
        raise InvalidRequest(f"replication factor must be at least 1, got {value}")
    return value
