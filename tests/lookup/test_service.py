"""`kvpool lookup` as a real process, with holders publishing from other processes and threads."""

from __future__ import annotations

import http.client
import json
import os
import re
import time

import grpc
import pytest

from kvpool.cachenode import Unavailable
from kvpool.cachenode.client.lookup import LookupClient, holders_of
from kvpool.cachenode.client.publisher import Publisher
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.rpc.proto import lookup_pb2 as pb
from kvpool.cachenode.rpc.proto import lookup_pb2_grpc as pb_grpc

from .conftest import HolderProcess, LookupProcess, run_lookup

LEASE = 1.5


def new_keys(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def wait_until(condition, timeout: float = 15.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not true within {timeout} s")


def metric(lookup: LookupProcess, name: str, labels: str = "") -> float:
    status, body = lookup.http("/metrics")
    assert status == 200
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+)"
    match = re.search(pattern, body.decode())
    return float(match.group(1)) if match else 0.0


class Holder:
    """A Publisher in this process (a thread) over a set of keys it keeps like a store would."""

    def __init__(self, url: str, holder_id: str, keys: list[bytes], kind: str = "agent", **kwargs) -> None:
        self.keys = set(keys)
        info = HolderInfo(holder_id, kind, "memory", f"grpc://{holder_id}:7420")
        self.publisher = Publisher(url, info, lambda: list(self.keys), **kwargs).start()

    def admit(self, keys: list[bytes]) -> None:
        self.keys.update(keys)
        self.publisher.admitted(keys)

    def evict(self, keys: list[bytes]) -> None:
        self.keys.difference_update(keys)
        self.publisher.evicted(keys)

    def flush(self) -> None:
        assert self.publisher.flush(15), self.publisher.stats()

    def stop(self) -> None:
        self.publisher.stop()


@pytest.fixture(scope="module")
def lookup():
    with run_lookup("--holder-lease", str(LEASE), "--rebuild-window", "0", "--max-query-keys", "512") as lk:
        yield lk


@pytest.fixture
def client(lookup):
    with LookupClient(lookup.url) as c:
        yield c


def test_admit_evict_and_query(lookup, client):
    keys = new_keys(10)
    a = Holder(lookup.url, "t1-agent-a", keys[:6])
    b = HolderProcess(lookup.url, "t1-agent-b", keys[:3] + keys[4:8], incarnation=11)
    try:
        a.flush()
        located = client.locate(keys)
        assert located.authoritative
        assert located.prefix == 8
        runs = {m.info.holder_id: m.run for m in located.holders}
        assert runs == {"t1-agent-a": 6, "t1-agent-b": 3}
        assert [h.holder_id for h in holders_of(located, 3)] == ["t1-agent-a"]
        assert [h.holder_id for h in holders_of(located, 7)] == ["t1-agent-b"]
        assert next(m.info for m in located.holders if m.info.holder_id == "t1-agent-a").address == (
            "grpc://t1-agent-a:7420"
        )

        a.evict(keys[1:2])
        b.admit(keys[8:10])
        a.flush()
        located = client.locate(keys)
        assert located.prefix == 10
        assert {m.info.holder_id: m.run for m in located.holders} == {"t1-agent-a": 1, "t1-agent-b": 3}
        assert [h.holder_id for h in holders_of(located, 1)] == ["t1-agent-b"]

        ranked, authoritative = client.scores(keys, tokens_per_key=256, kind="agent")
        assert authoritative
        assert [(s.info.holder_id, s.matched_tokens) for s in ranked] == [
            ("t1-agent-b", 768),
            ("t1-agent-a", 256),
        ]
        assert client.scores(keys, 256, kind="node")[0] == []
        stats = client.stats()
        mine = {h["holder_id"]: h for h in stats["holders"] if h["holder_id"].startswith("t1-")}
        assert mine["t1-agent-a"]["entries"] == 5 and mine["t1-agent-b"]["entries"] == 9
        assert mine["t1-agent-b"]["incarnation"] == 11
    finally:
        a.stop()
        b.close()


def test_scores_over_http_json(lookup):
    keys = new_keys(4)
    a = Holder(lookup.url, "t2-agent-a", keys[:4])
    n = Holder(lookup.url, "t2-node-0", keys[:2], kind="node")
    try:
        a.flush()
        n.flush()
        body = json.dumps({"keys": [k.hex() for k in keys], "tokens_per_key": 16}).encode()
        status, answer = lookup.http("/scores", body)
        assert status == 200
        answer = json.loads(answer)
        assert answer["scores"] == {"t2-agent-a": 64, "t2-node-0": 32}
        assert answer["prefix_keys"] == 4 and answer["authoritative"] is True
        assert answer["holders"][0]["address"] == "grpc://t2-agent-a:7420"
        only_agents = json.dumps({"keys": [k.hex() for k in keys], "tokens_per_key": 16, "kind": "agent"})
        assert json.loads(lookup.http("/scores", only_agents.encode())[1])["scores"] == {"t2-agent-a": 64}
        status, answer = lookup.http("/stats")
        assert status == 200 and json.loads(answer)["service"] == "lookup"
    finally:
        a.stop()
        n.stop()


def test_sequence_gap_is_refused_and_answered_with_resync(lookup, client):
    """Played by hand on the wire: batch 3 never arrives, batch 4 must not be applied."""
    keys = new_keys(5)
    stub = pb_grpc.LookupStub(grpc.insecure_channel(lookup.url.removeprefix("grpc://")))
    holder = pb.LookupHolder(holder_id="t3-agent", kind="agent", tier="memory", address="")

    def block(ks):
        return [pb.LookupKeys(key_size=32, keys=b"".join(ks))]

    reply = stub.Resync(
        iter([pb.LookupResyncFrame(holder=holder, incarnation=5, seq=1, keys=block(keys[:1]))])
    )
    assert reply.status == pb.LookupPublishResponse.OK and reply.lease_s == LEASE
    ok = stub.Publish(
        pb.LookupPublishRequest(holder_id="t3-agent", incarnation=5, seq=2, admitted=block(keys[1:2]))
    )
    assert ok.status == pb.LookupPublishResponse.OK
    gap = stub.Publish(
        pb.LookupPublishRequest(holder_id="t3-agent", incarnation=5, seq=4, admitted=block(keys[3:4]))
    )
    assert gap.status == pb.LookupPublishResponse.RESYNC and "gap" in gap.reason and gap.last_seq == 2
    assert client.locate(keys).prefix == 2
    assert client.locate(keys[3:4]).prefix == 0
    reply = stub.Resync(iter([pb.LookupResyncFrame(holder=holder, incarnation=5, seq=5, keys=block(keys))]))
    assert reply.status == pb.LookupPublishResponse.OK
    assert client.locate(keys).prefix == 5
    assert metric(lookup, "kvpool_lookup_resync_requests_total", 'reason="sequence_gap"') >= 1


def test_publisher_over_its_bound_resyncs_with_a_snapshot(lookup, client):
    """More events than it keeps: they are dropped (a gap) and a snapshot replaces them."""
    keys = new_keys(300)
    holder = Holder(lookup.url, "t4-agent", keys[:10], max_batch=16, max_pending=32)
    try:
        holder.flush()
        holder.publisher._lock.acquire()  # hold the sender back while events pile up
        try:
            holder.keys.update(keys[10:])
            holder.keys.difference_update(keys[:5])
        finally:
            holder.publisher._lock.release()
        holder.publisher.admitted(keys[10:])
        holder.publisher.evicted(keys[:5])
        holder.flush()
        stats = holder.publisher.stats()
        assert stats["overflows"] >= 1 and stats["resyncs"] >= 2 and stats["pending"] == 0
        assert client.locate(keys[5:]).prefix == 295
        assert client.locate(keys).prefix == 0
    finally:
        holder.stop()


def test_a_holder_that_stops_heartbeating_loses_its_entries_after_the_lease(lookup, client):
    keys = new_keys(6)
    quiet = HolderProcess(lookup.url, "t5-agent-gone", keys[:6], incarnation=1)
    alive = Holder(lookup.url, "t5-agent-alive", keys[:3])
    expired_before = metric(lookup, "kvpool_lookup_expired_holders_total")
    try:
        alive.flush()
        assert client.locate(keys).prefix == 6
        quiet.kill()  # the pod vanished: no goodbye
        killed_at = time.monotonic()
        wait_until(lambda: client.locate(keys).prefix == 3, timeout=4 * LEASE + 5)
        assert time.monotonic() - killed_at >= LEASE * 0.6  # not before the lease ran out
        assert {m.info.holder_id for m in client.locate(keys).holders} == {"t5-agent-alive"}
        # The live holder heartbeats (on by default) and keeps its entries over several leases.
        time.sleep(3 * LEASE)
        assert client.locate(keys).prefix == 3
        # (holders that earlier tests stopped expire too: count at least this one)
        assert metric(lookup, "kvpool_lookup_expired_holders_total") >= expired_before + 1
        assert metric(lookup, "kvpool_lookup_dropped_entries_total", 'reason="lease"') >= 6
        assert "t5-agent-gone" not in {h["holder_id"] for h in client.stats()["holders"]}
    finally:
        quiet.kill()
        alive.stop()


def test_a_restarted_holder_loses_its_old_entries():
    old_keys, new = new_keys(4), new_keys(2)
    # A lease far longer than a process start, so the entries can only go by the new incarnation.
    with (
        run_lookup("--holder-lease", "60", "--rebuild-window", "0") as lookup,
        LookupClient(lookup.url) as client,
    ):
        first = HolderProcess(lookup.url, "t6-agent", old_keys, incarnation=100)
        first.kill()  # restarted in place, within its lease: the new incarnation announces itself
        second = HolderProcess(lookup.url, "t6-agent", new, incarnation=101)
        _check_restarted_holder(lookup, client, old_keys, new, second)


def _check_restarted_holder(lookup, client, old_keys, new, second) -> None:
    try:
        assert client.locate(old_keys).prefix == 0
        located = client.locate(new)
        assert located.prefix == 2 and [m.info.holder_id for m in located.holders] == ["t6-agent"]
        mine = [h for h in client.stats()["holders"] if h["holder_id"] == "t6-agent"]
        assert mine[0]["incarnation"] == 101 and mine[0]["entries"] == 2
        assert metric(lookup, "kvpool_lookup_dropped_entries_total", 'reason="incarnation"') >= 4
    finally:
        second.close()


def test_restarted_lookup_rebuilds_its_index_from_resyncs_before_answering_authoritatively():
    keys = new_keys(20)
    with run_lookup("--holder-lease", str(LEASE), "--rebuild-window", "0") as first:
        port, http_port = first.port, first.http_port
        a = Holder(first.url, "t7-agent-a", keys[:12])
        b = HolderProcess(first.url, "t7-agent-b", keys[:20], incarnation=3)
        a.flush()
        with LookupClient(first.url) as c:
            before = c.locate(keys)
        first.kill()
    try:
        window = 3.0
        with run_lookup("--holder-lease", str(LEASE), "--rebuild-window", str(window),
                        port=port, http_port=http_port) as second:  # fmt: skip
            started = time.monotonic()
            with LookupClient(second.url) as c:
                # (this process's channels to the port may still be in their reconnect backoff)
                early = wait_until(lambda: _try(c.locate, keys), timeout=window)
                assert early.authoritative is False
                status, body = second.http("/readyz")
                assert status == 503 and b"rebuilding" in body
                # Holders hear "unknown holder" at their next heartbeat and resync.
                expected = {m.info.holder_id: m.run for m in before.holders}
                assert expected == {"t7-agent-a": 12, "t7-agent-b": 20}

                def runs():
                    return {m.info.holder_id: m.run for m in c.locate(keys).holders}

                wait_until(lambda: runs() == expected, timeout=10)
                wait_until(lambda: second.http("/readyz")[0] == 200, timeout=window + 5)
                assert time.monotonic() - started >= window * 0.9
                assert c.locate(keys).authoritative is True
                assert a.publisher.stats()["resyncs"] >= 2
    finally:
        a.stop()
        b.close()


def _try(call, *args):
    try:
        return call(*args)
    except Unavailable:
        return None


def test_bad_input_gets_clear_errors_and_changes_nothing(lookup, client):
    keys = new_keys(3)
    holder = Holder(lookup.url, "t8-agent", keys)
    holder.flush()
    stub = pb_grpc.LookupStub(grpc.insecure_channel(lookup.url.removeprefix("grpc://")))
    before = client.stats()
    bad_calls = [
        (stub.Locate, pb.LookupLocateRequest(keys=pb.LookupKeys(key_size=65, keys=b"x" * 65)), "key_size"),
        (stub.Locate, pb.LookupLocateRequest(keys=pb.LookupKeys(key_size=0, keys=b"")), "key_size"),
        (stub.Locate, pb.LookupLocateRequest(keys=pb.LookupKeys(key_size=32, keys=b"x" * 33)), "multiple"),
        (stub.Locate, pb.LookupLocateRequest(keys=pb.LookupKeys(key_size=1, keys=b"x" * 100_000)), "limit"),
        (stub.Scores, pb.LookupScoresRequest(keys=pb.LookupKeys(key_size=32, keys=keys[0]), tokens_per_key=0),
         "tokens_per_key"),
        (stub.Publish, pb.LookupPublishRequest(holder_id="t8-agent", incarnation=1, seq=2,
         evicted=[pb.LookupKeys(key_size=32, keys=b"".join(keys) + b"x")]), "multiple"),
        (stub.Publish, pb.LookupPublishRequest(holder_id="t8-agent", incarnation=1, seq=2,
         evicted=[pb.LookupKeys(key_size=1, keys=b"y" * 2_000_000)]), "limit"),
        (stub.Publish, pb.LookupPublishRequest(holder_id="x" * 300, incarnation=1, seq=2), "holder_id"),
        (stub.Heartbeat, pb.LookupHeartbeatRequest(holder_id=""), "holder_id"),
    ]  # fmt: skip
    for method, request, words in bad_calls:
        with pytest.raises(grpc.RpcError) as caught:
            method(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
        assert words in caught.value.details()
    bad_frames = [
        [pb.LookupResyncFrame(holder=pb.LookupHolder(holder_id="t8-agent", kind="pod", tier="memory"))],
        [pb.LookupResyncFrame(holder=pb.LookupHolder(holder_id="t8-agent", kind="agent", tier="")),],
        [pb.LookupResyncFrame(holder=pb.LookupHolder(holder_id="t8-agent", kind="agent", tier="memory"),
                              keys=[pb.LookupKeys(key_size=32, keys=b"z" * 31)])],
        [],
    ]  # fmt: skip
    for frames in bad_frames:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Resync(iter(frames), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for body, code in [
        (b"not json", 400),
        (b"[]", 400),
        (json.dumps({"keys": ["zz"], "tokens_per_key": 16}).encode(), 400),
        (json.dumps({"keys": [keys[0].hex()], "tokens_per_key": 0}).encode(), 400),
        (json.dumps({"keys": ["00" * 32] * 600, "tokens_per_key": 16}).encode(), 400),
    ]:
        status, answer = lookup.http("/scores", body)
        assert status == code, answer
    connection = http.client.HTTPConnection("127.0.0.1", lookup.http_port, timeout=10)
    connection.putrequest("POST", "/scores")
    connection.putheader("Content-Length", str(5 * 1024 * 1024))  # announced, never sent: refused first
    connection.endheaders()
    assert connection.getresponse().status == 413
    connection.close()
    assert lookup.http("/nowhere")[0] == 404
    assert lookup.http("/scores")[0] == 405  # a GET
    mine_before = next(h for h in before["holders"] if h["holder_id"] == "t8-agent")
    mine_after = next(h for h in client.stats()["holders"] if h["holder_id"] == "t8-agent")
    assert mine_after["entries"] == 3 and mine_after["last_seq"] == mine_before["last_seq"]
    assert client.locate(keys).prefix == 3
    assert lookup.proc.poll() is None
    holder.stop()


def test_auth_token_guards_everything_but_health(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    keys = new_keys(2)
    with run_lookup("--auth-token-file", str(token_file), "--rebuild-window", "0") as lookup:
        with LookupClient(lookup.url) as anonymous, pytest.raises(Exception, match="bearer token"):
            anonymous.locate(keys)
        holder = Holder(lookup.url, "t9-agent", keys, token="s3cret")
        try:
            holder.flush()
            with LookupClient(lookup.url, token="s3cret") as c:
                assert c.locate(keys).prefix == 2
        finally:
            holder.stop()
        body = json.dumps({"keys": [k.hex() for k in keys], "tokens_per_key": 1}).encode()
        assert lookup.http("/scores", body)[0] == 401
        assert lookup.http("/scores", body, token="s3cret")[0] == 200
        assert lookup.http("/metrics")[0] == 401
        assert lookup.http("/healthz")[0] == 200
