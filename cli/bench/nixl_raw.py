"""The raw-NIXL baseline of `kvpool bench node --transport nixl`: a process that holds the same
bytes in registered memory for a plain NIXL READ from another process (run with -P -m).

It prints one JSON line (agent metadata as hex, the region's address) and serves until its
stdin closes. The reader side, `RawNixlReader`, does what a hand-written NIXL program at its
best does: both regions registered once, one transfer request prepared once and re-posted.
"""

from __future__ import annotations

import json
import os
import sys
import time

from kvpool.cachenode.client.arena import Region
from kvpool.cachenode.client.nixl_common import MEM_TYPE, Agent


def serve(size: int, count: int) -> None:
    region = Region(size * count)
    chunk = os.urandom(size)
    for i in range(count):
        region.view[i * size : (i + 1) * size] = chunk
    agent = Agent("bench-raw", progress_thread=True)  # NIXL's default: serves READs while idle
    agent.register(region.address, region.capacity)
    print(json.dumps({"metadata": agent.metadata().hex(), "address": region.address}), flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin


class RawNixlReader:
    """Reads all `count` chunks of the baseline process in one prepared, re-posted READ."""

    def __init__(self, announce: str, size: int, count: int) -> None:
        info = json.loads(announce)
        self.size, self.count = size, count
        self.region = Region(size * count)
        self.region.view[::4096] = b"\0" * len(range(0, self.region.capacity, 4096))  # faulted in once
        self.agent = Agent("bench-reader")
        self.agent.register(self.region.address, self.region.capacity)
        agent = self.agent.agent
        self.peer = agent.add_remote_agent(bytes.fromhex(info["metadata"]))
        agent.make_connection(self.peer)
        local = agent.get_xfer_descs(
            [(self.region.address + i * size, size, 0) for i in range(count)], MEM_TYPE
        )
        remote = agent.get_xfer_descs([(info["address"] + i * size, size, 0) for i in range(count)], MEM_TYPE)
        self.handle = agent.initialize_xfer("READ", local, remote, self.peer, b"")

    def read(self) -> None:
        agent = self.agent.agent
        state = agent.transfer(self.handle)
        while state == "PROC":
            time.sleep(0.0002)
            state = agent.check_xfer_state(self.handle)
        if state != "DONE":
            raise RuntimeError(f"raw NIXL READ ended in state {state}")

    def chunk(self, i: int) -> bytes:
        return bytes(self.region.view[i * self.size : (i + 1) * self.size])

    def close(self) -> None:
        self.handle.release()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
