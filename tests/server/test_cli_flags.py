"""Nonsense flags: one line on stderr, exit code 2, no traceback, nothing started."""

from __future__ import annotations

import subprocess
import sys

import pytest

KVPOOL = [sys.executable, "-m", "kvpool.cli.main"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*KVPOOL, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--memory", "-1"], "--memory"),
        (["--memory", "lots"], "not a size"),
        (["--disk-dir", "/tmp/kvpool-x", "--disk-size", "10XB"], "unknown unit"),
        (["--disk-dir", "/proc/kvpool-cannot-exist", "--disk-size", "1GiB"], "--disk-dir"),
        (["--disk-size", "1GiB"], "needs --disk-dir"),
        (["--port", "70000"], "--port"),
        (["--max-batch-keys", "0"], "--max-batch-keys"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file"),
        (["--no-such-flag"], "no-such-flag"),
        (["--redis-url", "http://cache:6379"], "--redis-url"),
        (["--s3-url", "bucket-without-scheme"], "s3"),
        (["--low-watermark", "0.99"], "watermarks"),
        (["--peers", "grpc://node-1:99999"], "--peers"),
        (["--peers", "http://node-1:7400"], "--peers"),
        (["--replication-factor", "0"], "--replication-factor"),
        (["--handoff-deadline", "-1"], "--handoff-deadline"),
    ],
)
@pytest.mark.parametrize("command", ["node", "up"])
def test_bad_flags_exit_2_with_one_line(command, args, expected):
    result = run(command, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvpool: error:")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_disk_dir_that_is_a_file(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    result = run("node", "--disk-dir", str(afile), "--disk-size", "1MiB")
    assert result.returncode == 2
    assert "--disk-dir" in result.stderr and "Traceback" not in result.stderr


def test_env_vars_are_read(tmp_path):
    import os

    result = run("node", env={**os.environ, "KVPOOL_MEMORY": "-5"})
    assert result.returncode == 2 and "--memory" in result.stderr


def test_help_lists_the_commands_and_nothing_is_unimplemented():
    result = run("--help")
    assert result.returncode == 0
    for command in ("node", "up", "status", "bench"):
        assert command in result.stdout
    for command in ("node", "up", "status"):
        help_text = run(command, "--help").stdout
        assert "KVPOOL_" in help_text or command == "status"
        assert "not implemented" not in help_text.lower()


def test_status_of_a_running_pool(node):
    result = run("status", "--url", node.url)
    assert result.returncode == 0, result.stderr
    assert "memory" in result.stdout
    result = run("status", "--url", "grpc://127.0.0.1:1")
    assert result.returncode == 1
    assert result.stderr.startswith("kvpool: error:") and "Traceback" not in result.stderr
