"""How a pool client decides where each key goes: the members it knows, the views (sets of
members) of the last few minutes, and one request's picture of both.

Pure routing over `Placement` (rendezvous hashing): no calls are made here. A key's owners are
the best `replicas` members that take new keys; its candidates add the owners it had under the
earlier views still inside the handoff window, which is where a read asks before it misses. While
some member is not in every answering node's view (`unsettled`: nodes without `--peers`, or a
node the others have not seen yet), a writer that knew fewer nodes may have put a key on the next
node in rendezvous order, so the candidates also add up to `fallback_nodes` of those next nodes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from kvpool.cachenode.client import members as ms
from kvpool.cachenode.client.connection import NodeConnection
from kvpool.cachenode.core.breaker import CircuitBreaker, State
from kvpool.cachenode.core.placement import Placement

log = logging.getLogger(__name__)

MAX_PREVIOUS_VIEWS = 4


class Member:
    """A member as this client sees it: what the pool says, plus our own breaker."""

    __slots__ = ("breaker", "conn", "info")

    def __init__(self, info: ms.MemberInfo, conn: NodeConnection, breaker: CircuitBreaker) -> None:
        self.info = info
        self.conn = conn
        self.breaker = breaker

    @property
    def up(self) -> bool:
        return self.breaker.state is State.CLOSED

    def summary(self) -> dict:
        return {
            "node_id": self.info.node_id,
            "url": self.conn.url,
            "state": self.info.state if self.up or self.info.state == ms.DOWN else "unreachable",
            "incarnation": self.info.incarnation,
            "data_port": self.info.data_port,
            "http_port": self.info.http_port,
            "breaker": str(self.breaker.state),
        }


class Views:
    """The current placement and the earlier ones still inside the handoff window."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self.current: Placement | None = None
        self._previous: list[tuple[Placement, float]] = []  # (view, replaced at), newest first

    def observe(self, nodes: tuple[str, ...]) -> Placement:
        current = self.current
        if current is not None and current.nodes == nodes:
            return current
        with self._lock:
            if self.current is None or self.current.nodes != nodes:
                if self.current is not None:
                    log.info(
                        "pool view changed: %s -> %s",
                        ",".join(self.current.nodes) or "-",
                        ",".join(nodes) or "-",
                    )
                    self._remember(self.current, self._clock())
                self.current = Placement(nodes)
            return self.current

    def remember(self, nodes: Iterable[str], replaced_s_ago: float) -> None:
        """An earlier view a node reported (so a client started after a change knows it too)."""
        if replaced_s_ago <= 0 or replaced_s_ago >= self.window:
            return
        with self._lock:
            self._remember(Placement(nodes), self._clock() - replaced_s_ago)

    def previous(self) -> tuple[Placement, ...]:
        if not self._previous:
            return ()
        now = self._clock()
        with self._lock:
            self._previous = [(v, t) for v, t in self._previous if now - t < self.window]
            return tuple(v for v, _ in self._previous if v != self.current)

    def _remember(self, view: Placement, at: float) -> None:
        if not view.nodes:
            return
        kept = [(v, t) for v, t in self._previous if v != view]
        kept.append((view, at))
        kept.sort(key=lambda vt: -vt[1])
        self._previous = kept[:MAX_PREVIOUS_VIEWS]


@dataclass(frozen=True)
class Routing:
    """One request's picture of the pool."""

    members: dict[str, Member]
    current: Placement  # members that take new keys
    readable: frozenset[str]  # members that may be read from (ready or leaving, breaker closed)
    previous: tuple[Placement, ...]
    replicas: int
    unsettled: frozenset[str] = frozenset()  # members not in every answering node's view
    fallback_nodes: int = 0  # how many next nodes in rendezvous order a read may also ask

    def owners(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Each key's owners: the `replicas` best members that take new keys."""
        return self.current.owners_many(keys, self.replicas)

    def candidates(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Where each key may be, in the order to ask: its owners, then its owners in earlier
        views (those still readable), then the next nodes in rendezvous order (`next_nodes`)."""
        ranked = self._ranked(keys)
        out = [r[: self.replicas] for r in ranked] if ranked else self.owners(keys)
        for view in self.previous:
            for found, earlier in zip(out, view.owners_many(keys, self.replicas), strict=True):
                found.extend(n for n in earlier if n not in found and n in self.readable)
        for found, order in zip(out, ranked, strict=False):
            found.extend(n for n in self._next_nodes(order) if n not in found and n in self.readable)
        return out

    def _ranked(self, keys: Sequence[bytes]) -> list[list[str]]:
        """Each key's best `replicas + fallback_nodes` members; empty while every member is
        settled (the common case: no extra work)."""
        if not self.fallback_nodes or self.unsettled.isdisjoint(self.current.nodes):
            return []
        return self.current.owners_many(keys, self.replicas + self.fallback_nodes)

    def _next_nodes(self, ranked: list[str]) -> list[str]:
        """The members after a key's owners that owned it under a view lacking some unsettled
        members: walk on in rendezvous order until `replicas` settled members rank above (those
        own the key under every such view), at most `fallback_nodes` further."""
        settled = sum(1 for n in ranked[: self.replicas] if n not in self.unsettled)
        out: list[str] = []
        for node in ranked[self.replicas :]:
            if settled >= self.replicas:
                break
            out.append(node)
            settled += node not in self.unsettled
        return out

    def fallback_kind(self, key: bytes, node: str) -> str | None:
        """Why `node`, where `key` was found, was asked: None for a current owner,
        "earlier_view" for an owner under an earlier view, else "next_node"."""
        if node in self.owners([key])[0]:
            return None
        if any(node in view.owners(key, self.replicas) for view in self.previous):
            return "earlier_view"
        return "next_node"
