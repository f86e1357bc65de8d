"""The flags of `kvpool node`, `up`, `agent` and `lookup`, generated from the settings registry,
and NodeSettings / AgentSettings built from them (with the file reads the pure registry leaves to
the CLI)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import click

from kvpool.cachenode.core import settings as registry
from kvpool.cachenode.core.settings import AgentSettings, NodeSettings, Setting
from kvpool.cachenode.rpc.auth import load_token
from kvpool.cachenode.rpc.tls import ServerTLS, load_server_tls


class SettingType(click.ParamType):
    """A flag's value parsed by its setting's own parser (the one the operator checks pools with)."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self.name = setting.kind

    def convert(self, value: Any, param, ctx) -> Any:
        if not isinstance(value, str):
            return value  # a typed default
        try:
            return self.setting.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def setting_option(setting: Setting, command: str | None = None) -> Callable:
    """The click option of one setting: its flag, `KVPOOL_<NAME>` env var, default (`command`'s)
    and help."""
    default = setting.default_for(command)
    common = {
        "envvar": setting.env,
        "show_envvar": True,
        "show_default": default not in (None, ""),
        "help": setting.help,
    }
    if setting.negatable:
        negative = "--no-" + setting.flag[2:]
        return click.option(f"{setting.flag}/{negative}", setting.name, default=default, **common)
    return click.option(setting.flag, setting.name, type=SettingType(setting), default=default, **common)


def registry_options(
    settings: Iterable[Setting], command: str | None = None
) -> Callable[[Callable], Callable]:
    """Decorate a command with the flags of `settings`, in the given order."""
    options = [setting_option(s, command) for s in settings]

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def node_options(func: Callable) -> Callable:
    """Every flag of a node: addresses, membership, capacity, auth/TLS, shared tiers and their policy."""
    return registry_options(registry.for_command(registry.NODE), registry.NODE)(func)


def up_options(func: Callable) -> Callable:
    """The flags of `kvpool up`: a node's, less what `up` sets itself (--lookup-url: it runs its own)."""
    return registry_options(registry.for_command(registry.UP), registry.UP)(func)


def agent_options(func: Callable) -> Callable:
    """Every flag of an agent: its ports and identity, the lookup service, the pool, the arena,
    and the node flags it shares (memory, limits, auth/TLS, NIXL, the write-through queue)."""
    return registry_options(registry.for_command(registry.AGENT), registry.AGENT)(func)


def shared_tier_options(func: Callable) -> Callable:
    """The shared-tier flags alone (--pool-name, --redis-*, --s3-*, --tier-*), for `kvpool bench tiers`."""
    groups = ("tiers", "policy")
    return registry_options(s for s in registry.SETTINGS_LIST if s.group in groups and s.commands)(func)


def lookup_options(func: Callable) -> Callable:
    """Every flag of the lookup service: its bind address, ports, auth and TLS (the node's
    settings, with the lookup's defaults) and its own limits."""
    return registry_options(registry.for_command(registry.LOOKUP), registry.LOOKUP)(func)


def auth_tls_from_options(params: dict) -> tuple[str | None, ServerTLS | None]:
    """The bearer token and server TLS of --auth-token-file / --tls-cert-file / --tls-key-file
    (read here: the pure registry leaves file reads to the CLI)."""
    token = None
    if params.get("auth_token_file"):
        try:
            token = load_token(params["auth_token_file"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--auth-token-file") from None
    tls = None
    cert, key = params.get("tls_cert_file"), params.get("tls_key_file")
    if bool(cert) != bool(key):
        raise click.UsageError("--tls-cert-file and --tls-key-file go together")
    if cert:
        try:
            tls = load_server_tls(cert, key)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--tls-cert-file") from None
    return token, tls


def settings_from_options(params: dict) -> NodeSettings:
    """Build and validate settings; raises click.BadParameter/UsageError (exit code 2)."""
    token, tls = auth_tls_from_options(params)
    disk_dir = params.get("disk_dir")
    if disk_dir is not None:
        check_writable_dir(disk_dir)
    try:
        return registry.node_settings(params, auth_token=token, tls=tls)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def agent_settings_from_options(params: dict) -> AgentSettings:
    """Build and validate an agent's settings; raises click.BadParameter/UsageError (exit code 2)."""
    token, tls = auth_tls_from_options(params)
    check_writable_dir(params["arena_dir"], "--arena-dir")
    try:
        return registry.agent_settings(params, hostname=socket.gethostname(), auth_token=token, tls=tls)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def check_writable_dir(path: Path, flag: str = "--disk-dir") -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kvpool-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.BadParameter(f"{path} is not a writable directory ({reason})", param_hint=flag) from None
    if not os.access(path, os.W_OK):
        raise click.BadParameter(f"{path} is not writable", param_hint=flag)
