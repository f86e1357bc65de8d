"""LMCache 0.5.6's `lm://` server and client beside kvpool in `kvpool bench node --lmcache PYTHON`.

LMCache lives in its own venv (scripts/install-lmcache.sh): it pins other torch/CUDA packages
than kvpool's, so it is never imported here. This process starts LMCache's own server
(`python -m lmcache.v1.server 127.0.0.1 PORT cpu`, as its docs run it) and a driver
(lmcache_driver.py) that runs LMCache's client with that venv's interpreter; the bench asks the
driver for one timed put or get pass at a time, in its rotated order, and gets back the seconds
the pass took in the driver and what it moved (bytes, each value's ends)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click

from .moved import Moved

INSTALL = "scripts/install-lmcache.sh"
DRIVER = Path(__file__).with_name("lmcache_driver.py")
CHECK = "import lmcache.v1.server.__main__, lmcache.v1.storage_backend.remote_backend"


@dataclass
class Timed:
    """A pass timed by another process: its seconds, and what it moved (a Moved, or bytes put)."""

    seconds: float
    out: Moved | int


def _env() -> dict[str, str]:
    return {**os.environ, "LMCACHE_LOG_LEVEL": "WARNING", "PYTHONSAFEPATH": "1"}


def check(python: str) -> None:
    """A clear error unless LMCache's server and client import with `python`."""
    try:
        result = subprocess.run(
            [python, "-P", "-c", CHECK], capture_output=True, text=True, timeout=300, env=_env()
        )
    except OSError as e:
        raise click.ClickException(
            f"--lmcache {python}: cannot run it ({e}); create LMCache's venv with {INSTALL}"
        ) from e
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise click.ClickException(
            f"--lmcache {python}: LMCache does not import there ({last}); "
            f"install it into its own venv with {INSTALL}, then pass --lmcache .venv-lmcache/bin/python"
        )


def _free_port() -> int:
    """A port for LMCache's server, which takes one on its command line (it cannot report one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LMCache:
    """LMCache's server and the driver of its client, for one bench invocation (a context manager)."""

    def __init__(self, python: str, payloads: dict[str, bytes]) -> None:
        """Start both (the caller ran `check(python)` first); the driver loads `payloads`."""
        self.port = _free_port()
        self.server = subprocess.Popen(
            [python, "-P", "-m", "lmcache.v1.server", "127.0.0.1", str(self.port), "cpu"],
            stdout=subprocess.DEVNULL,
            env=_env(),
        )
        self.driver = subprocess.Popen(
            [python, "-P", str(DRIVER), str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        try:
            self.version = self._read()["lmcache"]
            with tempfile.TemporaryDirectory() as tmp:  # the bench's own bytes, for every path alike
                for name, value in payloads.items():
                    path = Path(tmp, name)
                    path.write_bytes(value)
                    self._ask(op="value", path=str(path))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LMCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> dict:
        line = self.driver.stdout.readline()
        if not line:
            raise click.ClickException(
                f"LMCache's driver exited (code {self.driver.poll()}); its stderr is above"
            )
        answer = json.loads(line)
        if "error" in answer:
            raise click.ClickException(f"LMCache's driver: {answer['error']}")
        return answer

    def _ask(self, **command: object) -> dict:
        self.driver.stdin.write(json.dumps(command) + "\n")
        self.driver.stdin.flush()
        return self._read()

    def put(self, size: int, count: int) -> Timed:
        """`count` puts of the `size`-byte value through LMCache's client; bytes stored."""
        answer = self._ask(op="put", size=size, count=count)
        return Timed(answer["seconds"], answer["nbytes"])

    def get(self, size: int, count: int) -> Timed:
        """`count` gets through LMCache's client of what `put` stored; fails if a whole value
        (the first and last, compared outside the timed pass) differs from the value put."""
        answer = self._ask(op="get", size=size, count=count)
        if not answer["whole_ok"]:
            raise click.ClickException("LMCache returned bytes that differ from what was put")
        moved = Moved(nbytes=answer["nbytes"])
        moved.ends = [(bytes.fromhex(head), bytes.fromhex(tail)) for head, tail in answer["ends"]]
        return Timed(answer["seconds"], moved)

    def close(self) -> None:
        if self.driver.poll() is None:
            try:
                self.driver.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.driver.stdin.close()
                self.driver.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.driver.kill()
                self.driver.wait()
        self.server.terminate()
        try:
            self.server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
