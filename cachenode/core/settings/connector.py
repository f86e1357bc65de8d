"""What the vLLM connector starts from: `ConnectorSettings`, from kv_connector_extra_config keys,
each overridable by env `KVPOOL_<NAME>` (the registry's settings read by CLIENT).

Precedence: kv_connector_extra_config, then env, then the default — the extra_config is what a user
wrote on the command line for this engine, so it wins. No vLLM import: the scheduler and the
workers both call `load_settings`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpool.cachenode.core.settings.defaults import DEFAULT_EMBEDDED_DISK_SIZE
from kvpool.cachenode.core.settings.registry import SETTINGS, default
from kvpool.cachenode.core.settings.setting import CLIENT


@dataclass(frozen=True)
class ConnectorSettings:
    url: str | None = default("url")  # grpc://host:port of a node / agent / `kvpool up`; None → embedded
    chunk_size: int = default("chunk_size")  # tokens per chunk; a multiple of vLLM's block size
    memory: int = default("memory", CLIENT)  # embedded pool: L1 bytes
    disk_dir: str | None = None  # embedded pool: L2 directory (survives restarts)
    disk_size: int = default("disk_size")  # embedded pool: L2 bytes (default 8 GiB when disk_dir is set)
    timeout_ms: float = default("timeout_ms")  # deadline of every remote pool call
    load: bool = default("load")  # look up and load chunks
    save: bool = default("save")  # store newly computed chunks
    layerwise: bool = default(
        "layerwise"
    )  # synchronous loads: scatter layer i just before layer i's attention
    load_async: str = default("load_async")  # "auto" (remote pools: yes; embedded pool: no), "true", "false"
    lookup_wait_ms: float = default("lookup_wait_ms")  # the most the scheduler waits for a lookup
    announced_wait_ms: float = default("announced_wait_ms")  # wait for a producer's announced chunks
    save_buffer: int = default(
        "save_buffer"
    )  # host bytes (pinned on GPUs) for chunks copied out, not yet written
    model_id: str | None = None  # a name added to the fingerprint (the weights' digest identifies the model)
    load_failure_policy: str = default("load_failure_policy")  # what vLLM does when a load fails
    lease_ms: int = default(
        "lease_ms"
    )  # a lookup pins what it found this long (until the worker read it); 0 = off
    auth_token: str | None = field(default=None, repr=False)  # bearer token of a pool with auth on
    auth_token_file: str | None = None  # ... or the file that holds it (a mounted Secret)
    shutdown_flush_ms: float = default("shutdown_flush_ms")  # at shutdown, wait this long for queued saves

    def validate(self) -> None:
        """Raise ValueError with a one-line message for any nonsense setting."""
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if not 0 <= self.lease_ms <= 600_000:
            raise ValueError("lease_ms must be between 0 and 600000")
        if self.load_failure_policy not in ("recompute", "fail"):
            raise ValueError("load_failure_policy must be 'recompute' or 'fail'")
        if not 0 <= self.lookup_wait_ms <= 1000:
            raise ValueError("lookup_wait_ms must be between 0 and 1000")
        if not 0 <= self.announced_wait_ms <= 600_000:
            raise ValueError("announced_wait_ms must be between 0 and 600000")
        if self.save_buffer < 0:
            raise ValueError("save_buffer must not be negative")
        if not 0 <= self.shutdown_flush_ms <= 600_000:
            raise ValueError("shutdown_flush_ms must be between 0 and 600000")


_FIELDS = tuple(f.name for f in dataclasses.fields(ConnectorSettings))
_KEPT_AS_TEXT = ("disk_dir", "auth_token_file")
"""Paths the connector keeps as they were written (its parser checks them)."""


ROLES: dict[str, tuple[bool, bool] | None] = {
    "kv_both": None,
    "kv_producer": (False, True),
    "kv_consumer": (True, False),
}
"""vLLM's ``kv_role`` → (load, save): a prefill engine (producer) stores and never loads, a decode
engine (consumer) loads and never stores; kv_both leaves both to the `load` and `save` settings
(docs/connector.md, *Roles*)."""


def load_settings(
    extra: Mapping[str, Any] | None, env: Mapping[str, str] | None = None, kv_role: str | None = None
) -> ConnectorSettings:
    """The connector's settings from extra_config, else `env` (default: this process's), else the
    registry's defaults, then `kv_role` (None: as kv_both); ValueError names the setting that is
    wrong, or the one that contradicts the role."""
    env = os.environ if env is None else env
    extra = extra or {}
    values: dict[str, Any] = {}
    for name in _FIELDS:
        setting = SETTINGS[name]
        raw = extra.get(name)
        if raw is None:
            raw = env.get(setting.env)
        if raw is None or raw == "":
            continue
        try:
            value = setting.parse(raw)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        values[name] = str(raw) if name in _KEPT_AS_TEXT else value
    if kv_role is not None:
        values.update(_role_sides(kv_role, values))
    settings = ConnectorSettings(**values)
    if settings.disk_dir and not settings.disk_size:
        settings = dataclasses.replace(settings, disk_size=DEFAULT_EMBEDDED_DISK_SIZE)
    settings.validate()
    return settings


def _role_sides(kv_role: str, given: Mapping[str, Any]) -> dict[str, bool]:
    """`load` and `save` as the role sets them; a value the user gave that the role contradicts
    is refused rather than silently overridden (a producer told to load was meant to be kv_both)."""
    if kv_role not in ROLES:
        raise ValueError(f"kv_role: {kv_role!r} is not one of {', '.join(ROLES)}")
    if ROLES[kv_role] is None:
        return {}
    sides = dict(zip(("load", "save"), ROLES[kv_role], strict=True))
    for name, wanted in sides.items():
        if name in given and given[name] != wanted:
            raise ValueError(
                f"{name}: {str(given[name]).lower()} contradicts kv_role {kv_role!r}, which "
                f"{'loads' if sides['load'] else 'never loads'} and "
                f"{'stores' if sides['save'] else 'never stores'} KV (set by kv_connector_extra_config "
                f"or {SETTINGS[name].env}); remove it or use kv_role 'kv_both'"
            )
    return sides


def loads_async(s: ConnectorSettings) -> bool:
    """Whether hits load in the background (vLLM's load-async path) rather than inside the step:
    by default for a remote pool or agent, where a load waits on the network; the embedded pool's
    loads are memory copies in the worker itself."""
    return s.load_async == "true" or (s.load_async == "auto" and bool(s.url))
