"""`AgentClient.close()` right after a get (a vLLM worker's connector at shutdown). A get ends its
arena lease with a Done call that it does not wait for. A `close()` that shut the channel at once
cancelled that call ("CANCELLED: Channel closed!"), and the lease (its pinned bytes) then stayed in
the agent until its TTL (30 s by default). Found by test_agent_killed_mid_transfer.py, which
failed about once in 8 runs. A real `kvpool agent` process.

To hold the Done call in flight when `close()` runs, the agent is stopped (SIGSTOP) just before
the call is sent, and continued (SIGCONT) 0.3 s later from another thread."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from kvpool.cachenode.client.agent import AgentClient

from .conftest import agent_stats

pytestmark = pytest.mark.timeout(120)


def test_close_right_after_a_get_lets_its_lease_end(cluster, monkeypatch) -> None:
    a = cluster.agent("agent-c", "--nixl", "off")
    key, value = b"close".ljust(32, b"."), os.urandom(300_000)
    with a.client() as writer:
        assert writer.put_many({key: value}) == 1
    real_done = AgentClient._done
    resumed = threading.Timer(0.3, a.proc.send_signal, (signal.SIGCONT,))

    def done_to_a_stopped_agent(self, lease) -> None:
        a.proc.send_signal(signal.SIGSTOP)
        resumed.start()
        real_done(self, lease)

    client = a.client()
    try:
        monkeypatch.setattr(AgentClient, "_done", done_to_a_stopped_agent)
        assert client.get_many([key]) == {key: value}
        monkeypatch.undo()
        client.close()  # the Done call is in flight: the agent answers it once continued
    finally:
        resumed.join()
        a.proc.send_signal(signal.SIGCONT)
    stats = agent_stats(a)  # at once: no lease may be left waiting for its TTL
    assert stats["agent"]["arena_leases"] == 0, stats["agent"]
    assert stats["pinned_bytes"] == 0 and stats["leases"] == 0, stats
