"""Real `kvpool node` processes peered into one pool on loopback, each on fixed free ports so a
node can be killed and restarted with the same id, ports and disk."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cli.devtools.local_servers import free_port, wait_port


@dataclass
class Node:
    node_id: str
    port: int
    http_port: int
    data_port: int
    disk_dir: Path | None
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"grpc://{self.address}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connection(self) -> NodeConnection:
        """A direct line to this node alone (no routing), to see what it holds."""
        return NodeConnection("127.0.0.1", self.port, ConnectOptions(timeout=5))


@dataclass
class Pool:
    """Starts, kills and restarts nodes; every node lists every other as a peer."""

    workdir: Path
    extra: tuple[str, ...] = ()
    nodes: list[Node] = field(default_factory=list)

    def add(self, *, disk: bool = False) -> Node:
        i = len(self.nodes)
        node = Node(
            node_id=f"n{i}",
            port=free_port(),
            http_port=free_port(),
            data_port=free_port(),
            disk_dir=self.workdir / f"disk-{i}" if disk else None,
            log=self.workdir / f"n{i}.log",
        )
        self.nodes.append(node)
        return node

    def start(self, node: Node, *extra: str) -> Node:
        peers = ",".join(n.address for n in self.nodes if n is not node)
        args = [
            sys.executable, "-P", "-m", "kvpool.cli.main", "node",
            "--host", "127.0.0.1", "--port", str(node.port), "--http-port", str(node.http_port),
            "--data-port", str(node.data_port), "--node-id", node.node_id, "--peers", peers,
            "--memory", "64MiB", "--log-level", "info", *self.extra, *extra,
        ]  # fmt: skip
        if node.disk_dir is not None:
            args += ["--disk-dir", str(node.disk_dir), "--disk-size", "128MiB"]
        log = open(node.log, "a")  # noqa: SIM115 (handed to the child)
        node.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_port(node.port, proc=node.proc)
        return node

    def start_all(self, count: int, *, disk: bool = False) -> list[Node]:
        for _ in range(count):
            self.add(disk=disk)
        for node in self.nodes:
            self.start(node)
        self.wait_members(len(self.nodes))
        return self.nodes

    def urls(self, order: list[int] | None = None) -> str:
        order = order if order is not None else list(range(len(self.nodes)))
        return ",".join(self.nodes[i].url for i in order)

    def wait_members(self, count: int, client: Client | None = None, timeout: float = 30) -> None:
        """Until `client` (else a fresh one) sees `count` members ready and answering."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            alive = [n for n in self.nodes if n.alive]
            with contextlib.ExitStack() as stack:
                c = client or stack.enter_context(Client(alive[0].url, timeout=2))
                with contextlib.suppress(Exception):
                    last = c.members()
                    if sum(1 for m in last if m["state"] == "ready" and m["breaker"] == "closed") == count:
                        return
            time.sleep(0.2)
        raise AssertionError(f"pool did not reach {count} ready members: {last}\n{self.logs()}")

    def pause(self, node: Node, timeout: float = 10) -> None:
        """SIGSTOP, then wait until every thread has stopped: a multi-threaded process takes a
        moment to stop, and meanwhile its other threads still answer requests."""
        node.proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{node.proc.pid}/task")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = []
            for task in tasks.iterdir():
                with contextlib.suppress(OSError):
                    states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            if states and all(state in "tT" for state in states):
                return
            time.sleep(0.001)
        raise AssertionError(f"{node.node_id} did not stop within {timeout} s")

    def resume(self, node: Node) -> None:
        node.proc.send_signal(signal.SIGCONT)

    def kill(self, node: Node) -> None:
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(timeout=10)

    def terminate(self, node: Node, timeout: float = 60) -> int:
        node.proc.send_signal(signal.SIGTERM)
        return node.proc.wait(timeout=timeout)

    def logs(self) -> str:
        return "\n".join(
            f"--- {n.node_id}\n{n.log.read_text()[-3000:]}" for n in self.nodes if n.log.exists()
        )

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.proc.send_signal(signal.SIGKILL)
                node.proc.wait(timeout=10)


@pytest.fixture
def pool(tmp_path) -> Iterator[Pool]:
    p = Pool(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()


def values(prefix: str, n: int, size: int = 2000) -> dict[bytes, bytes]:
    return {f"{prefix}-{i}".encode(): os.urandom(size + i % 7) for i in range(n)}


def wait_until(predicate, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
