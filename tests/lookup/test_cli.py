"""`kvpool lookup` flags and `kvpool status` pointed at a lookup service."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvpool.cachenode.client.publisher import Publisher
from kvpool.cachenode.core.holders import HolderInfo

from .conftest import run_lookup

KVPOOL = [sys.executable, "-P", "-m", "kvpool.cli.main"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*KVPOOL, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--holder-lease", "0"], "--holder-lease"),
        (["--rebuild-window", "-1"], "--rebuild-window"),
        (["--port", "70000"], "--port"),
        (["--max-query-keys", "0"], "--max-query-keys"),
        (["--max-batch-events", "2000000"], "--max-batch-events"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file"),
        (["--tls-cert-file", "/etc/hostname"], "--tls-key-file"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args, expected):
    result = run("lookup", *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvpool: error:") and expected in lines[0], result.stderr
    assert result.stdout == ""


def test_flags_are_read_from_env_vars():
    result = run("lookup", env={**os.environ, "KVPOOL_HOLDER_LEASE": "-3"})
    assert result.returncode == 2 and "--holder-lease" in result.stderr
    assert "KVPOOL_HOLDER_LEASE" in run("lookup", "--help").stdout


def test_status_shows_the_index():
    with run_lookup("--rebuild-window", "0") as lookup:
        keys = [os.urandom(32) for _ in range(5)]
        info = HolderInfo("status-agent", "agent", "memory", "grpc://10.0.0.9:7420")
        with Publisher(lookup.url, info, lambda: keys) as publisher:
            assert publisher.flush(15)
            result = run("status", "--url", lookup.url, env={**os.environ, "COLUMNS": "200"})
            assert result.returncode == 0, result.stderr
            assert "1 holders, 5 keys, 5 entries" in result.stdout
            assert "status-agent" in result.stdout and "grpc://10.0.0.9:7420" in result.stdout
            raw = run("status", "--url", lookup.url, "--json")
            stats = json.loads(raw.stdout)
            assert stats["service"] == "lookup" and stats["entries"] == 5
            assert stats["holders"][0]["holder_id"] == "status-agent"
