"""What a pool member is, and how reports from several nodes become one member list. Pure.

Nodes answer `Members` with themselves and the peers they know; clients (and nodes probing each
other) merge several such answers. The rules, so every reader converges on the same list:
- a node's report about itself wins over what others say about it (it knows its own state,
  incarnation and ports);
- otherwise the entry with the highest incarnation wins (a restarted node has a larger one);
- between equal incarnations, one reporter that reaches the member beats one that does not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb

STARTING = "starting"
READY = "ready"
LEAVING = "leaving"
DOWN = "down"

# Which members take new keys (placement) and which may still be read from.
PLACED_STATES = frozenset({READY})
READABLE_STATES = frozenset({READY, LEAVING})


@dataclass(frozen=True, slots=True)
class MemberInfo:
    node_id: str
    host: str
    grpc_port: int
    data_port: int = 0
    http_port: int = 0
    state: str = READY
    incarnation: int = 0

    @classmethod
    def from_pb(cls, member: pb.Member, reached_host: str | None = None) -> MemberInfo:
        """`reached_host`: the host the reply came from, for a node that left its host empty."""
        return cls(
            node_id=member.node_id,
            host=member.host or reached_host or "",
            grpc_port=member.grpc_port,
            data_port=member.data_port,
            http_port=member.http_port,
            state=member.state,
            incarnation=member.incarnation,
        )

    def to_pb(self) -> pb.Member:
        return pb.Member(
            node_id=self.node_id,
            host=self.host,
            grpc_port=self.grpc_port,
            data_port=self.data_port,
            http_port=self.http_port,
            state=self.state,
            incarnation=self.incarnation,
        )

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.grpc_port

    def with_state(self, state: str) -> MemberInfo:
        return self if state == self.state else replace(self, state=state)


@dataclass(frozen=True, slots=True)
class Report:
    """One node's answer: itself, and the peers it knows with the state it sees them in."""

    node: MemberInfo
    peers: tuple[MemberInfo, ...] = ()
    replication_factor: int = 0
    previous: tuple[str, ...] = ()
    changed_s_ago: float = 0.0

    @classmethod
    def from_pb(cls, reply: pb.MembersResponse, reached_host: str) -> Report:
        return cls(
            node=MemberInfo.from_pb(reply.node, reached_host),
            peers=tuple(MemberInfo.from_pb(p) for p in reply.peers if p.host),
            replication_factor=reply.replication_factor,
            previous=tuple(reply.previous),
            changed_s_ago=reply.changed_s_ago,
        )


def merge(reports: Iterable[Report]) -> dict[str, MemberInfo]:
    """Every member named in `reports`, one entry each, by the rules in the module docstring."""
    reports = list(reports)
    merged: dict[str, MemberInfo] = {r.node.node_id: r.node for r in reports}
    reported_itself = set(merged)
    for report in reports:
        for peer in report.peers:
            if peer.node_id in reported_itself:
                continue
            have = merged.get(peer.node_id)
            if have is None or _newer(peer, have):
                merged[peer.node_id] = peer
    return merged


def _newer(candidate: MemberInfo, have: MemberInfo) -> bool:
    if candidate.incarnation != have.incarnation:
        return candidate.incarnation > have.incarnation
    return have.state == DOWN and candidate.state != DOWN


def unsettled(reports: Iterable[Report]) -> frozenset[str]:
    """Members that some answering node does not count as ready (a node on its own, without
    `--peers`, counts only itself): a client that knew fewer nodes may have placed a key on the
    next node in rendezvous order instead, so reads of such keys ask there too (routing.py)."""
    reports = list(reports)
    views = [{r.node.node_id} | {p.node_id for p in r.peers if p.state in PLACED_STATES} for r in reports]
    named = set().union(*views) if views else set()
    return frozenset(n for n in named if any(n not in view for view in views))
