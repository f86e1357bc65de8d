"""The flags shared by `kvpool node` and `kvpool up`, turned into NodeSettings."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

from kvpool.cachenode.auth import load_token
from kvpool.cachenode.settings import (
    DEFAULT_DATA_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_BATCH_KEYS,
    DEFAULT_MAX_VALUE_SIZE,
    DEFAULT_MEMORY,
    NodeSettings,
)
from kvpool.cachenode.shared_config import SharedTiersConfig, shared_tier_options
from kvpool.cachenode.tls import load_server_tls

from .options import PORT, SIZE, option

NODE_OPTIONS = [
    option("--host", default="0.0.0.0", help="Address to bind every port on."),
    option("--port", type=PORT, default=DEFAULT_GRPC_PORT, help="gRPC port (0 = a free port)."),
    option(
        "--http-port", type=PORT, default=DEFAULT_HTTP_PORT, help="HTTP port for /metrics, /healthz, /readyz."
    ),
    option(
        "--data-port", type=PORT, default=DEFAULT_DATA_PORT, help="TCP data channel port (0 = a free port)."
    ),
    option("--memory", type=SIZE, default=DEFAULT_MEMORY, help="L1 memory budget, e.g. 512MiB, 4GiB."),
    option(
        "--disk-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="L2 disk tier directory.",
    ),
    option("--disk-size", type=SIZE, default="0", help="L2 disk budget, e.g. 100GiB (needs --disk-dir)."),
    option(
        "--max-value-size", type=SIZE, default=DEFAULT_MAX_VALUE_SIZE, help="Largest value a put may carry."
    ),
    option(
        "--max-batch-keys",
        type=click.IntRange(1, 1_000_000),
        default=DEFAULT_MAX_BATCH_KEYS,
        help="Most keys in one request.",
    ),
    option(
        "--high-watermark",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.95,
        help="Evict once a tier passes this fill.",
    ),
    option(
        "--low-watermark",
        type=click.FloatRange(0, 1, min_open=True),
        default=0.85,
        help="...down to this fill.",
    ),
    option(
        "--auth-token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Require this bearer token.",
    ),
    option(
        "--tls-cert-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Serve TLS on every port with this certificate chain (PEM).",
    ),
    option(
        "--tls-key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="The private key of --tls-cert-file (PEM).",
    ),
    option("--node-id", default="", help="Stable node identity (default: hostname + random suffix)."),
    option("--advertise-host", default="", help="Host clients should use for the data channel."),
]


def node_options(func: Callable) -> Callable:
    """The node's own flags plus the shared-tier flags (--redis-url, --s3-url, policy, ...)."""
    func = shared_tier_options(func)
    for decorator in reversed(NODE_OPTIONS):
        func = decorator(func)
    return func


def settings_from_options(params: dict) -> NodeSettings:
    """Build and validate settings; raises click.BadParameter/UsageError (exit code 2)."""
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
    try:
        shared = SharedTiersConfig.from_options(**params)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    disk_dir = params.get("disk_dir")
    if disk_dir is not None:
        check_writable_dir(disk_dir)
    settings = NodeSettings(
        host=params["host"],
        port=params["port"],
        http_port=params["http_port"],
        data_port=params["data_port"],
        memory=params["memory"],
        disk_dir=disk_dir,
        disk_size=params["disk_size"],
        max_value_size=params["max_value_size"],
        max_batch_keys=params["max_batch_keys"],
        auth_token=token,
        tls=tls,
        node_id=params["node_id"],
        advertise_host=params["advertise_host"],
        high_watermark=params["high_watermark"],
        low_watermark=params["low_watermark"],
        shared=shared,
    )
    try:
        settings.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return settings


def check_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kvpool-probe-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise click.BadParameter(
            f"{path} is not a writable directory ({reason})", param_hint="--disk-dir"
        ) from None
    if not os.access(path, os.W_OK):
        raise click.BadParameter(f"{path} is not writable", param_hint="--disk-dir")
