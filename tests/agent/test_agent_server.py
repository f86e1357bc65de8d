"""An agent in this process: its arena file (one owner, stale files replaced, memory allocated up
front), bad input answered with clear statuses, and the connector's choice of pool."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from kvpool.cachenode.client.agent import AgentClient
from kvpool.cachenode.client.arena_file import arena_path
from kvpool.cachenode.client.lookup import open_channel
from kvpool.cachenode.core import settings as registry
from kvpool.cachenode.core.errors import ArenaBusy
from kvpool.cachenode.core.record import checksum
from kvpool.cachenode.rpc.proto import agent_pb2 as pb
from kvpool.cachenode.rpc.proto import agent_pb2_grpc as pb_grpc
from kvpool.cachenode.server.agent.server import AgentServer
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector.backend import open_pool

from .conftest import wait_until


@pytest.fixture
def arena_dir():
    d = Path(tempfile.mkdtemp(prefix="kvpool-test-", dir="/dev/shm"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_agent(arena_dir: Path, agent_id: str = "solo", **values) -> AgentServer:
    settings = registry.agent_settings(
        {"host": "127.0.0.1", "port": 0, "http_port": 0, "data_port": 0, "memory": 8 << 20,
         "arena_dir": arena_dir, "agent_id": agent_id, "nixl": "off", **values},
        hostname="unused",
    )  # fmt: skip
    agent = AgentServer(settings)
    agent.start()
    return agent


def test_one_agent_per_arena_and_a_dead_agents_file_is_replaced(arena_dir) -> None:
    stale = arena_path(arena_dir, "solo")
    stale.write_bytes(b"left by an agent that died")  # nobody holds its lock
    agent = make_agent(arena_dir)
    try:
        assert stale.stat().st_size == agent.store.memory.arena_bytes
        assert stale.stat().st_mode & 0o777 == 0o660  # the vLLM container (same fsGroup) maps it too
        with pytest.raises(ArenaBusy, match="another kvpool agent"):
            make_agent(arena_dir)
        assert stale.exists()  # the live agent's arena was left alone
        with AgentClient(agent.url) as client:
            assert client.put_many({b"k" * 32: b"v" * 1000}) == 1
    finally:
        agent.stop()
    assert not stale.exists()


def test_the_arena_mode_lets_a_vllm_container_of_another_user_map_it(arena_dir) -> None:
    agent = make_agent(arena_dir, **registry.parse_env({"KVPOOL_ARENA_MODE": "0666"}, registry.AGENT))
    try:
        assert arena_path(arena_dir, "solo").stat().st_mode & 0o777 == 0o666
    finally:
        agent.stop()
    for bad in ("0777", "0440", "rw"):
        with pytest.raises(ValueError, match=r"KVPOOL_ARENA_MODE=.*(octal|owner read and write)"):
            registry.parse_env({"KVPOOL_ARENA_MODE": bad}, registry.AGENT)


def test_an_arena_dir_too_small_for_memory_is_a_clear_error(tiny_tmpfs) -> None:
    with pytest.raises(OSError, match=r"no room for a \d+-byte arena"):
        make_agent(tiny_tmpfs, memory=8 << 20)
    assert os.listdir(tiny_tmpfs) == []


def test_bad_input_gets_clear_statuses_and_changes_nothing(arena_dir) -> None:
    agent = make_agent(arena_dir, max_value_size=1 << 20)
    channel = open_channel(agent.url)
    stub = pb_grpc.AgentStub(channel)
    try:

        def code(call, request) -> grpc.StatusCode:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=5)
            return info.value.code()

        assert code(stub.Locate, pb.AgentLocateRequest(keys=[b"x" * 65])) == grpc.StatusCode.INVALID_ARGUMENT
        assert code(stub.Locate, pb.AgentLocateRequest(keys=[b"k"], lease_ms=10**9)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        too_big = pb.AgentReserveRequest(entries=[pb.AgentPutEntry(key=b"k", size=(1 << 20) + 1)])
        assert code(stub.Reserve, too_big) == grpc.StatusCode.INVALID_ARGUMENT
        twice = pb.AgentReserveRequest(entries=[pb.AgentPutEntry(key=b"k", size=10)] * 2)
        assert code(stub.Reserve, twice) == grpc.StatusCode.INVALID_ARGUMENT
        no_room = pb.AgentReserveRequest(
            entries=[pb.AgentPutEntry(key=bytes([i]), size=1 << 20) for i in range(9)]
        )
        assert code(stub.Reserve, no_room) == grpc.StatusCode.RESOURCE_EXHAUSTED

        # a value written wrong (or not at all) is refused whole, and its lease is over
        lease = stub.Reserve(pb.AgentReserveRequest(entries=[pb.AgentPutEntry(key=b"good", size=4),
                                                             pb.AgentPutEntry(key=b"bad", size=4)]))  # fmt: skip
        sums = [checksum(b"good", b"\0" * 4), checksum(b"bad", b"1234")]
        commit = pb.AgentCommitRequest(lease_id=lease.lease_id, token=lease.token, checksums=sums)
        assert code(stub.Commit, commit) == grpc.StatusCode.DATA_LOSS
        assert code(stub.Commit, commit) == grpc.StatusCode.FAILED_PRECONDITION
        forged = pb.AgentDoneRequest(lease_id=lease.lease_id + 1, token=12345)
        assert not stub.Done(forged).released
        got = stub.Get(pb.AgentGetRequest(keys=[b"good", b"bad"]))
        assert list(got.sizes) == [-1, -1] and got.lease_id == 0
        assert len(agent.leases) == 0 and agent.store.memory.usage == 0
    finally:
        channel.close()
        agent.stop()


def test_the_connector_uses_the_arena_of_an_agent_in_its_pod_and_the_network_otherwise(arena_dir) -> None:
    agent = make_agent(arena_dir)
    other = make_agent(arena_dir, agent_id="elsewhere")
    try:
        here = open_pool(agent.url, memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=5)
        assert here.put_many([(b"c" * 32, b"chunk")])
        here.flush()
        assert here.get_many([b"c" * 32]) == [b"chunk"]
        assert "shared memory" in here.pool.name
        # every get lease was ended (Done is sent without waiting for its answer)
        wait_until(lambda: agent.stats()["agent"]["arena_leases"] == 0, timeout=5, what="the leases ended")
        # an agent whose arena file this process cannot open is another pod's: over the network
        arena_path(arena_dir, "elsewhere").unlink()
        there = open_pool(other.url, memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=5)
        assert there.put_many([(b"d" * 32, b"chunk2")])
        there.flush()
        assert there.get_many([b"d" * 32]) == [b"chunk2"]
        assert "shared memory" not in there.pool.name
        with kvpool_up("--memory", "64MiB") as (_proc, url):  # a pool of nodes: the kvpool client
            nodes = open_pool(url, memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=5)
            assert nodes.prefix_hits([b"e" * 32]) == 0 and nodes.pool.name == url
    finally:
        agent.stop()
        other.stop()
