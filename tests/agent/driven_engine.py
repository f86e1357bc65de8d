"""The test side of engine_session.py: start the engine process, send it commands, wait for its
answers (files it renames into place), and replay what it was sent on a cache-off engine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = str(Path(__file__).with_name("engine_session.py"))


class DrivenEngine:
    """One engine_session.py process; kill() at the end whatever happened (by its PID)."""

    def __init__(self, model: str, extra: dict, workdir: Path) -> None:
        self.out = workdir / "session"
        self.out.mkdir()
        self.log_path = workdir / "session.log"
        spec = workdir / "session.json"
        spec.write_text(json.dumps({"model": model, "out_dir": str(self.out), "extra": extra}))
        log = open(self.log_path, "w")  # noqa: SIM115 (handed to the child process)
        self.proc = subprocess.Popen(
            [sys.executable, "-P", SCRIPT, str(spec)],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.sent: dict[str, dict] = {}  # name -> the generate command, in the order sent

    def log(self) -> str:
        return self.log_path.read_text()

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def start(self, name: str, prompts: list[list[int]], max_tokens: int) -> None:
        """Send a generate command without waiting for its outputs."""
        assert name not in self.sent, f"step {name} sent twice"
        cmd = {"op": "generate", "name": name, "prompts": prompts, "max_tokens": max_tokens}
        self.sent[name] = cmd
        self.send(cmd)

    def started(self, name: str) -> bool:
        return (self.out / f"{name}.started").exists()

    def done(self, name: str) -> bool:
        return (self.out / f"{name}.json").exists()

    def wait_file(self, name: str, timeout: float = 900) -> object:
        """The JSON the engine wrote as ``<name>.json`` (the engine's start-up counts here)."""
        path = self.out / f"{name}.json"
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, (
                f"the engine exited ({self.proc.returncode}):\n{self.log()[-6000:]}"
            )
            assert time.monotonic() < deadline, f"no {path.name} after {timeout} s:\n{self.log()[-6000:]}"
            time.sleep(0.05)
        return json.loads(path.read_text())

    def generate(self, name: str, prompts: list[list[int]], max_tokens: int) -> list[dict]:
        self.start(name, prompts, max_tokens)
        return self.wait_file(name)

    def baseline(self) -> dict[str, list[dict]]:
        """Every step sent so far (identical ones once), run again by the same engine without a
        connector; the connector's engine is shut down first."""
        steps, seen = [], set()
        for cmd in self.sent.values():
            what = json.dumps([cmd["prompts"], cmd["max_tokens"]])
            if what not in seen:
                seen.add(what)
                steps.append({k: cmd[k] for k in ("name", "prompts", "max_tokens")})
        self.send({"op": "baseline", "steps": steps})
        found = self.wait_file("baseline")
        for cmd in self.sent.values():  # a repeated step's outputs are its first copy's
            if cmd["name"] not in found:
                twin = next(
                    s for s in steps if [s["prompts"], s["max_tokens"]] == [cmd["prompts"], cmd["max_tokens"]]
                )
                found[cmd["name"]] = found[twin["name"]]
        return found

    def exit(self, timeout: float = 120) -> int:
        self.send({"op": "exit"})
        self.proc.stdin.close()
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
