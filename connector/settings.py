"""Connector settings: extra_config keys, each overridable by env ``KVPOOL_<NAME>``.

Pure; no vLLM import. Precedence: kv_connector_extra_config, then env, then the default — the
extra_config is what a user wrote on the command line for this engine, so it wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from kvpool.cachenode.core.sizes import parse_size


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


def _tristate(v: Any, name: str) -> str:
    text = str(v).strip().lower()
    if text == "auto":
        return "auto"
    if isinstance(v, bool) or text in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return "true" if _bool(v) else "false"
    raise ValueError(f"{name} must be auto, true or false, got {v!r}")


@dataclass(frozen=True)
class ConnectorSettings:
    url: str | None = None  # grpc://host:port of a node / agent / `kvpool up`; None → embedded
    chunk_size: int = 256  # tokens per chunk; a multiple of vLLM's block size
    memory: int = 2 << 30  # embedded pool: L1 bytes
    disk_dir: str | None = None  # embedded pool: L2 directory (survives restarts)
    disk_size: int = 0  # embedded pool: L2 bytes (default 8 GiB when disk_dir is set)
    timeout_ms: float = 500.0  # deadline of every remote pool call
    load: bool = True  # look up and load chunks
    save: bool = True  # store newly computed chunks
    layerwise: bool = True  # synchronous loads: scatter layer i just before layer i's attention
    load_async: str = "auto"  # "auto" (remote pools: yes; embedded pool: no), "true", "false"
    lookup_wait_ms: float = 0.3  # the scheduler waits at most this long for a lookup, then asks again
    save_buffer: int = 1 << 30  # host bytes (pinned on GPUs) for chunks copied out, not yet written
    model_id: str | None = None  # a name added to the fingerprint (the weights' digest identifies the model)
    load_failure_policy: str = "recompute"  # what vLLM does when a load fails
    lease_ms: int = 10_000  # a lookup pins what it found this long (until the worker read it); 0 = off
    auth_token: str | None = field(default=None, repr=False)  # bearer token of a pool with auth on
    auth_token_file: str | None = None  # ... or the file that holds it (a mounted Secret)
    shutdown_flush_ms: float = 5000.0  # at shutdown / SIGINT / SIGTERM, wait this long for queued saves


_FIELDS = {
    "url": str,
    "chunk_size": int,
    "memory": parse_size,
    "disk_dir": str,
    "disk_size": parse_size,
    "timeout_ms": float,
    "load": _bool,
    "save": _bool,
    "layerwise": _bool,
    "load_async": lambda v: _tristate(v, "load_async"),
    "lookup_wait_ms": float,
    "save_buffer": parse_size,
    "model_id": str,
    "load_failure_policy": str,
    "lease_ms": int,
    "auth_token": str,
    "auth_token_file": str,
    "shutdown_flush_ms": float,
}


def load_settings(extra: dict[str, Any] | None, env: dict[str, str] | None = None) -> ConnectorSettings:
    env = os.environ if env is None else env
    extra = extra or {}
    values: dict[str, Any] = {}
    for name, conv in _FIELDS.items():
        raw = extra.get(name)
        if raw is None:
            raw = env.get(f"KVPOOL_{name.upper()}")
        if raw is None or raw == "":
            continue
        values[name] = conv(raw)
    s = ConnectorSettings(**values)
    if s.disk_dir and not s.disk_size:
        s = ConnectorSettings(**{**s.__dict__, "disk_size": 8 << 30})
    if s.chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if not 0 <= s.lease_ms <= 600_000:
        raise ValueError("lease_ms must be between 0 and 600000")
    if s.load_failure_policy not in ("recompute", "fail"):
        raise ValueError("load_failure_policy must be 'recompute' or 'fail'")
    if not 0 <= s.lookup_wait_ms <= 1000:
        raise ValueError("lookup_wait_ms must be between 0 and 1000")
    if s.save_buffer < 0:
        raise ValueError("save_buffer must not be negative")
    if not 0 <= s.shutdown_flush_ms <= 600_000:
        raise ValueError("shutdown_flush_ms must be between 0 and 600000")
    return s


def loads_async(s: ConnectorSettings) -> bool:
    """Whether hits load in the background (vLLM's load-async path) rather than inside the step:
    by default for a remote pool or agent, where a load waits on the network; the embedded pool's
    loads are memory copies in the worker itself."""
    return s.load_async == "true" or (s.load_async == "auto" and bool(s.url))
