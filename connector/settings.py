"""Connector settings: extra_config keys, each overridable by env ``KVPOOL_<NAME>``.

Pure; no vLLM import. Precedence: kv_connector_extra_config, then env, then the default — the
extra_config is what a user wrote on the command line for this engine, so it wins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kvpool.cachenode.sizes import parse_size


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


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
    layerwise: bool = True  # scatter layer i just before layer i's attention
    model_id: str | None = None  # fingerprint model name (default: the model path/name vLLM got)
    load_failure_policy: str = "recompute"  # what vLLM does when a load fails


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
    "model_id": str,
    "load_failure_policy": str,
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
    if s.load_failure_policy not in ("recompute", "fail"):
        raise ValueError("load_failure_policy must be 'recompute' or 'fail'")
    return s
