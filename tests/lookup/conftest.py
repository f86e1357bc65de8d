"""Real `kvpool lookup` processes on free loopback ports, and holder processes that publish to them."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from kvpool.cli.devtools import local_servers
from kvpool.cli.devtools.local_servers import kvpool_lookup

HOLDER_SCRIPT = Path(__file__).with_name("holder_process.py")


class LookupProcess(local_servers.LookupProcess):
    """`kvpool lookup` as the tests drive it: its HTTP API, and SIGKILL."""

    def http(self, path: str, body: bytes | None = None, token: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def run_lookup(*args: str, port: int = 0, http_port: int = 0) -> Iterator[LookupProcess]:
    with kvpool_lookup("--log-level", "info", *args, port=port, http_port=http_port) as lk:
        yield LookupProcess(lk.proc, lk.url, lk.port, lk.http_port)


class HolderProcess:
    """A Publisher in its own process: `admit`/`evict` keys, `flush`; kill() makes it vanish."""

    def __init__(self, url: str, holder_id: str, keys: list[bytes], incarnation: int, *extra: str) -> None:
        cmd = [sys.executable, "-P", str(HOLDER_SCRIPT), url, holder_id, str(incarnation), *extra]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._send("snapshot " + ",".join(k.hex() for k in keys))

    def _send(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer.startswith("ok"):
            raise RuntimeError(f"holder process answered {answer!r} (exit {self.proc.poll()})")
        return answer

    def admit(self, keys: list[bytes]) -> None:
        self._send("admit " + ",".join(k.hex() for k in keys))

    def evict(self, keys: list[bytes]) -> None:
        self._send("evict " + ",".join(k.hex() for k in keys))

    def stats(self) -> str:
        return self._send("stats")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
