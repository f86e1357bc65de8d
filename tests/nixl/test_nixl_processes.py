"""NIXL between real processes: a node in one, clients in this and other processes, UCX over
loopback. Every test ends with no lease left and the pinned-bytes metric back at 0."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from kvpool.cachenode import Client, InvalidRequest, Unavailable
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.nixl import NixlLink, hello
from kvpool.cachenode.client.nixl_common import release_message
from kvpool.cachenode.core.errors import NixlFailed
from kvpool.cachenode.core.record import checksum
from kvpool.cachenode.rpc.proto import nixl_pb2 as pb
from kvpool.cachenode.rpc.proto import nixl_pb2_grpc as pb_grpc
from kvpool.cli.devtools.local_servers import free_port

from .conftest import LEASE_TTL_S, nixl_node, nixl_or_skip

CLIENT = str(Path(__file__).with_name("client_proc.py"))
MiB = 1 << 20
SIZES = [1, 17, 4095, 4096, 4097, 65_536, MiB - 3, MiB, 5 * MiB + 11, 32 * MiB]

pytestmark = pytest.mark.usefixtures("unpinned_after")


def route_of(client: Client):
    """The NIXL route of a one-node pool's only member (a test looks inside)."""
    (member,) = client._ensure_members().values()
    return member.conn._nixl


def stub(node) -> pb_grpc.NixlTransferStub:
    return pb_grpc.NixlTransferStub(grpc.insecure_channel(node.url.split("://")[1]))


def test_bytes_identical_for_many_sizes(node):
    values = {b"sizes-%d" % size: os.urandom(size) for size in SIZES}
    with node.client() as client:
        assert client.transport_in_use.startswith("nixl over shared memory")
        client.put_many(values)
        got = client.get_many([*values, b"sizes-absent"])
        assert set(got) == set(values) and all(got[k] == v for k, v in values.items())
        into = client.get_many_into(list(values))
        try:
            assert all(bytes(into[k].view) == v for k, v in values.items())
        finally:
            for buf in into.values():
                buf.release()
    stats = node.stats()
    assert stats["tiers"]["memory"]["entries"] >= len(values)


def test_one_batched_transfer_moves_many_chunks(node):
    values = {b"batch-%d" % i: os.urandom(2 * MiB) for i in range(24)}
    with node.client() as client:
        client.put_many(values)
        before = node.stats()["tiers"]["memory"]["hits"]
        got = client.get_many(list(values))
        assert got == values
        assert node.stats()["tiers"]["memory"]["hits"] == before + len(values)


def test_values_over_nixl_are_the_same_over_tcp(node):
    value = os.urandom(3 * MiB + 1)
    with node.client() as fast, Client(node.url, transport="grpc") as tcp:
        fast.put(b"cross-1", value)
        assert tcp.get(b"cross-1") == value
        tcp.put(b"cross-2", value[::-1])
        assert fast.get(b"cross-2") == value[::-1]
        assert fast.get(b"cross-1") == value


def test_leases_are_released_by_the_transfer_notification(node):
    with node.client() as client:
        client.put(b"notify", os.urandom(4 * MiB))
        for _ in range(5):
            assert len(client.get(b"notify")) == 4 * MiB
        stats = node.wait_unpinned(timeout=LEASE_TTL_S / 2)  # well before any TTL could end them
    assert stats["pinned_bytes"] == 0 and stats["leases"] == 0


def test_several_concurrent_client_processes(node):
    procs = [
        subprocess.Popen(
            [sys.executable, "-P", CLIENT, "roundtrip", node.url, str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
        assert out.startswith("ok nixl over shared memory"), out


def test_client_killed_mid_transfer_leases_expire_and_memory_returns(node):
    with Client(node.url, transport="grpc") as c:
        c.put(b"held-key", os.urandom(2 * MiB))
    base = node.wait_unpinned()["tiers"]["memory"]["arena_used"]
    proc = subprocess.Popen(
        [sys.executable, "-P", CLIENT, "hold", node.url, "held-key"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("held"), proc.stderr.read() if proc.poll() is not None else line
        stats = node.stats()
        assert stats["pinned_bytes"] == 2 * MiB + MiB and stats["leases"] == 2
        assert stats["tiers"]["memory"]["arena_used"] == base + MiB  # the half-written reservation
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    stats = node.wait_unpinned()
    assert stats["pinned_bytes"] == 0 and stats["leases"] == 0
    deadline = time.monotonic() + 2 * LEASE_TTL_S + 5  # the reservation also waits out its quarantine
    while node.stats()["tiers"]["memory"]["arena_used"] != base and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.stats()["tiers"]["memory"]["arena_used"] == base
    with node.client() as client:
        assert client.get(b"never-committed") is None  # never committed: never visible
        assert len(client.get(b"held-key")) == 2 * MiB


def test_node_restart_client_reconnects(tmp_path):
    nixl_or_skip()
    ports = ["--port", str(free_port()), "--data-port", str(free_port())]
    disk = ["--memory", "64MiB", "--disk-dir", str(tmp_path), "--disk-size", "64MiB"]
    value = os.urandom(6 * MiB)
    with nixl_node(*ports, *disk) as first:
        client = first.client(timeout=5)
        client.put(b"survivor", value)
        old_agent = client.transport_in_use
        assert first.stats()["tiers"]["disk"] is not None
        assert Client(first.url, transport="grpc").stats()  # the put is acknowledged
        deadline = time.monotonic() + 10
        while not first.stats()["tiers"]["disk"]["entries"] and time.monotonic() < deadline:
            time.sleep(0.05)
    with nixl_node(*ports, *disk) as second:
        try:
            assert second.url == first.url
            # The client's channel may still be in its reconnect backoff (at most ~1 s) when the
            # node is back: a call inside it fails fast, the next one after it reconnects.
            deadline = time.monotonic() + 10
            while True:
                try:
                    got = client.get(b"survivor")  # over NIXL, via the restarted node's new agent
                    break
                except Unavailable:  # NixlRequired in "nixl" mode
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert got == value
            assert client.transport_in_use != old_agent and client.transport_in_use.startswith("nixl")
            client.put(b"after-restart", value[:MiB])
            assert client.get(b"after-restart") == value[:MiB]
        finally:
            client.close()


def test_stale_agent_name_is_a_clear_error(node):
    with pytest.raises(grpc.RpcError) as info:
        stub(node).NixlGet(pb.NixlGetRequest(keys=[b"x"], agent_name="kvpool-node-someone-else"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stale NIXL session" in info.value.details()


def test_bad_commits_store_nothing(node):
    s = stub(node)
    name = s.NixlHello(pb.NixlHelloRequest()).agent_name
    lease = s.NixlReserve(
        pb.NixlReserveRequest(entries=[pb.NixlPutEntry(key=b"bad-commit", size=4096)], agent_name=name)
    )
    with pytest.raises(grpc.RpcError) as info:  # another token: not this client's lease
        s.NixlCommit(pb.NixlCommitRequest(lease_id=lease.lease_id, token=lease.token ^ 1, checksums=[0]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as info:  # nothing was written: the bytes do not match
        s.NixlCommit(
            pb.NixlCommitRequest(
                lease_id=lease.lease_id, token=lease.token, checksums=[checksum(b"bad-commit", b"x" * 4096)]
            )
        )
    assert info.value.code() == grpc.StatusCode.DATA_LOSS and "nothing stored" in info.value.details()
    with Client(node.url, transport="grpc") as c:
        assert c.get(b"bad-commit") is None


@pytest.mark.parametrize(
    "entries, code",
    [
        ([pb.NixlPutEntry(key=b"", size=10)], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.NixlPutEntry(key=b"k", size=0)], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.NixlPutEntry(key=b"k", size=65 * MiB)], grpc.StatusCode.INVALID_ARGUMENT),
        (
            [pb.NixlPutEntry(key=b"k%d" % i, size=60 * MiB) for i in range(7)],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
    ids=["empty-key", "empty-value", "over-max-value-size", "more-than-l1"],
)
def test_bad_reservations_are_refused(node, entries, code):
    s = stub(node)
    name = s.NixlHello(pb.NixlHelloRequest()).agent_name
    used = node.stats()["tiers"]["memory"]["arena_used"]
    with pytest.raises(grpc.RpcError) as info:
        s.NixlReserve(pb.NixlReserveRequest(entries=entries, agent_name=name))
    assert info.value.code() == code and info.value.details()
    assert node.stats()["tiers"]["memory"]["arena_used"] <= used


def test_bad_metadata_and_descriptors_are_clear_errors(node):
    value = os.urandom(MiB)
    with node.client() as client:
        client.put(b"intact", value)
        link = route_of(client).link
        s = stub(node)
        reply = s.NixlHello(pb.NixlHelloRequest())
        # metadata that is not NIXL's: refused before anything is loaded
        garbage = pb.NixlHelloResponse()
        garbage.CopyFrom(reply)
        garbage.agent_name, garbage.agent_metadata = "kvpool-node-fake", b"not nixl metadata"
        with pytest.raises(NixlFailed, match="metadata") as info:
            link._load(garbage)
        assert info.value.reason == "bad_metadata"
        # a READ outside the node's registered memory: the transfer fails, the node is untouched
        lease = s.NixlGet(pb.NixlGetRequest(keys=[b"intact"], agent_name=link.node_agent))
        buf = client.buffers.acquire(MiB)
        try:
            with pytest.raises(NixlFailed):
                link._transfer(
                    "READ",
                    local=[(link._pool_base + buf.offset, MiB, 0)],
                    remote=[(lease.addresses[0] + 1 << 40, MiB, 0)],
                    notify=b"",
                    deadline=time.monotonic() + 10,
                )
        finally:
            buf.release()
            assert s.NixlRelease(pb.NixlReleaseRequest(lease_id=lease.lease_id, token=lease.token)).released
        assert client.get(b"intact") == value


def _bad_notifications(node) -> float:
    """The node's count of notifications it ignored (forged or malformed), from /metrics."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/metrics", timeout=5).read().decode()
    tag = 'kvpool_node_errors_total{kind="nixl_bad_notification"} '
    return sum(float(ln.split()[-1]) for ln in body.splitlines() if ln.startswith(tag))


def test_forged_release_notification_ends_nothing(node):
    """A release with a wrong token and a garbage message end no lease. No sleep stands in for
    "nothing happened": a valid release of a second lease, sent after them on the same link, is the
    barrier (the node reads one peer's notifications in order), and the node has counted both."""
    with node.client() as client:
        client.put(b"forged", os.urandom(MiB))
        client.put(b"barrier", os.urandom(MiB))
        link = route_of(client).link
        s = stub(node)
        lease = s.NixlGet(pb.NixlGetRequest(keys=[b"forged"], agent_name=link.node_agent))
        barrier = s.NixlGet(pb.NixlGetRequest(keys=[b"barrier"], agent_name=link.node_agent))
        assert node.stats()["pinned_bytes"] == 2 * MiB
        bad = _bad_notifications(node)
        with link.agent.lock:
            link.agent.agent.send_notif(link.node_agent, release_message(lease.lease_id, lease.token + 1))
            link.agent.agent.send_notif(link.node_agent, b"something else entirely")
            link.agent.agent.send_notif(link.node_agent, release_message(barrier.lease_id, barrier.token))
        deadline = time.monotonic() + 10
        while (
            node.stats()["pinned_bytes"] > MiB or _bad_notifications(node) < bad + 2
        ) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _bad_notifications(node) == bad + 2  # both forged messages were read and ignored
        stats = node.stats()
        assert (stats["pinned_bytes"], stats["leases"]) == (MiB, 1)  # the barrier ended; the forged one held
        with link.agent.lock:
            link.agent.agent.send_notif(link.node_agent, release_message(lease.lease_id, lease.token))
        assert node.wait_unpinned(timeout=5)["pinned_bytes"] == 0


def test_auto_falls_back_per_request_and_counts_it(node):
    big = os.urandom(3 * MiB)
    with Client(node.url, transport="auto", receive_buffer_bytes=2 * MiB) as client:
        deadline = time.monotonic() + 30
        while not client.transport_in_use.startswith("nixl") and time.monotonic() < deadline:
            time.sleep(0.05)  # auto sets NIXL up in the background as it connects
        assert client.transport_in_use.startswith("nixl over shared memory")
        client.put(b"fallback-big", big)  # writes from the caller's memory: no receive buffer needed
        assert client.get(b"fallback-big") == big  # larger than the receive pool: over TCP
        assert route_of(client).fallbacks == 1
        assert client.get(b"fallback-big") == big and route_of(client).fallbacks == 2
        client.put(b"fallback-small", big[:MiB])
        assert client.get(b"fallback-small") == big[:MiB] and route_of(client).fallbacks == 2


def test_forced_nixl_raises_instead_of_falling_back(node):
    with node.client(receive_buffer_bytes=MiB) as client:
        client.put(b"forced-big", os.urandom(2 * MiB))
        with pytest.raises(Unavailable, match="does not fit"):
            client.get(b"forced-big")


def test_node_without_nixl_serves_everything_over_tcp():
    nixl_or_skip()
    with nixl_node("--nixl", "off", "--memory", "64MiB") as node:
        reply = hello(grpc.insecure_channel(node.url.split("://")[1]), lambda m, r: m(r))[1]
        assert not reply.enabled and "--nixl off" in reply.reason
        with Client(node.url) as auto:
            value = os.urandom(2 * MiB)
            auto.put(b"tcp-only", value)
            assert auto.get(b"tcp-only") == value
            assert auto.transport_in_use.startswith("tcp data channel")
        with pytest.raises(Unavailable, match="--nixl off"):
            Client(node.url, transport="nixl")


def test_without_the_nixl_package_everything_works_over_tcp(node):
    """A client process in which nixl cannot be imported: auto uses the data channel."""
    script = (
        "import sys, os\n"
        "for name in ('nixl', 'nixl_cu12', 'nixl_cu13'): sys.modules[name] = None\n"
        "from kvpool.cachenode import Client\n"
        f"c = Client({node.url!r})\n"
        "v = os.urandom(3 << 20); c.put(b'no-nixl', v); assert c.get(b'no-nixl') == v\n"
        "import time; time.sleep(0.5)\n"
        "print(c.transport_in_use)\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tcp data channel (NIXL unavailable: the nixl package is not installed" in result.stdout


def test_bad_transport_name_is_refused(node):
    with pytest.raises(InvalidRequest, match="transport must be one of"):
        Client(node.url, transport="rdma")


def test_nixl_link_refuses_a_node_it_cannot_use(node):
    """The link checks that the metadata it loads names the agent the node announced."""
    s = stub(node)
    reply = s.NixlHello(pb.NixlHelloRequest())
    reply.agent_name = "kvpool-node-not-this-one"
    host, port = node.url.split("://")[1].rsplit(":", 1)
    conn = NodeConnection(host, int(port), ConnectOptions())
    with contextlib.closing(conn), pytest.raises(NixlFailed, match="names agent"):
        NixlLink(conn._channel, conn._call, conn._buffers(), hello=reply)
