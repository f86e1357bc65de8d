"""Real `kvpool agent`, `kvpool node` and `kvpool lookup` processes on free loopback ports, each
agent with its own arena directory under /dev/shm (removed afterwards)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvpool.cachenode.client.agent import AgentClient
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cli.devtools.local_servers import free_port, kvpool_lookup, wait_port

KVPOOL = [sys.executable, "-P", "-m", "kvpool.cli.main"]


@dataclass
class Proc:
    name: str
    port: int
    args: list[str]
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Proc:
        log = open(self.log, "a")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen([*KVPOOL, *self.args], stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, timeout=60, proc=self.proc)
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def client(self, **kwargs) -> AgentClient:
        return AgentClient(self.url, timeout=10, **kwargs)


@dataclass
class Cluster:
    """Starts agents and nodes; stops every process it started (by PID) at the end."""

    workdir: Path
    arena_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def node(self, name: str, *extra: str, lookup: str | None = None) -> Proc:
        port = free_port()
        args = ["node", "--host", "127.0.0.1", "--port", str(port), "--http-port", str(free_port()),
                "--data-port", str(free_port()), "--node-id", name, "--memory", "64MiB", "--log-level", "info",
                *(["--lookup-url", lookup] if lookup else []), *extra]  # fmt: skip
        return self._add(Proc(name, port, args, self.workdir / f"{name}.log"))

    def agent(self, name: str, *extra: str, lookup: str | None = None, pool: str | None = None) -> Proc:
        port = free_port()
        args = ["agent", "--host", "127.0.0.1", "--port", str(port), "--http-port", str(free_port()),
                "--data-port", str(free_port()), "--agent-id", name, "--memory", "64MiB",
                "--arena-dir", str(self.arena_dir), "--fetch-timeout", "3", "--log-level", "info",
                *(["--lookup-url", lookup] if lookup else []), *(["--pool-url", pool] if pool else []),
                *extra]  # fmt: skip
        return self._add(Proc(name, port, args, self.workdir / f"{name}.log"))

    def _add(self, proc: Proc) -> Proc:
        self.procs.append(proc.start())
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.log.read_text()[-3000:]}" for p in self.procs if p.log.exists())

    def stop_all(self) -> None:
        for p in self.procs:
            if p.alive:
                p.proc.send_signal(signal.SIGKILL)
                p.proc.wait(timeout=10)


@pytest.fixture
def cluster(tmp_path) -> Iterator[Cluster]:
    arena_dir = Path(tempfile.mkdtemp(prefix="kvpool-test-", dir="/dev/shm"))
    c = Cluster(tmp_path, arena_dir)
    try:
        yield c
    finally:
        c.stop_all()
        shutil.rmtree(arena_dir, ignore_errors=True)


@pytest.fixture
def lookup() -> Iterator[str]:
    """A lookup service with a short holder lease (2 s) that answers authoritatively at once."""
    with kvpool_lookup("--holder-lease", "2", "--rebuild-window", "0", "--log-level", "info") as lk:
        yield lk.url


def holders(lookup_url: str, keys: list[bytes]) -> dict[str, int]:
    """holder id -> how many of `keys` (of the located prefix) it holds, as the index says."""
    with LookupClient(lookup_url) as client:
        located = client.locate(keys)
    return {m.info.holder_id: bin(int.from_bytes(m.bitmap, "little")).count("1") for m in located.holders}


def agent_stats(proc: Proc) -> dict:
    with proc.client() as client:
        return client.stats()


def wait_until(predicate, timeout: float = 20, what: str = "condition", logs=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = predicate()
            if last:
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last})\n{logs()}")


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)[:3000]
