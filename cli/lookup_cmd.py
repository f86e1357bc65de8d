"""`kvpool lookup`: the pool's P2P lookup service (which agent or node holds which chunk)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import click

from kvpool.cachenode.server.lookup.settings import (
    DEFAULT_HOLDER_LEASE_S,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_BATCH_EVENTS,
    DEFAULT_MAX_HOLDERS,
    DEFAULT_MAX_QUERY_KEYS,
    DEFAULT_MAX_SNAPSHOT_KEYS,
    DEFAULT_PORT,
    LookupSettings,
)

from .node_options import auth_tls_from_options, auth_tls_options
from .options import PORT, log_level_option, option, setup_logging
from .serve import stop_on_signals

log = logging.getLogger(__name__)

LOOKUP_OPTIONS = [
    option("--host", default="0.0.0.0", help="Address to bind both ports on."),
    option("--port", type=PORT, default=DEFAULT_PORT, help="gRPC port (0 = a free port)."),
    option(
        "--http-port",
        type=PORT,
        default=DEFAULT_HTTP_PORT,
        help="HTTP port: /metrics, /healthz, /readyz, POST /scores, GET /stats.",
    ),
    option(
        "--holder-lease",
        type=click.FloatRange(0.5, 3600),
        default=DEFAULT_HOLDER_LEASE_S,
        help="Seconds a holder keeps its entries without a heartbeat or batch (holders heartbeat at a third).",
    ),
    option(
        "--rebuild-window",
        type=click.FloatRange(0, 3600),
        default=None,
        help="Seconds after start before answers are authoritative and /readyz passes [default: the lease].",
    ),
    option(
        "--max-query-keys",
        type=click.IntRange(1, 1_000_000),
        default=DEFAULT_MAX_QUERY_KEYS,
        help="Most keys in one Locate/Scores query.",
    ),
    option(
        "--max-batch-events",
        type=click.IntRange(1, 1_000_000),
        default=DEFAULT_MAX_BATCH_EVENTS,
        help="Most events in one published batch.",
    ),
    option(
        "--max-snapshot-keys",
        type=click.IntRange(1, 1 << 30),
        default=DEFAULT_MAX_SNAPSHOT_KEYS,
        help="Most keys in one holder's snapshot (resync).",
    ),
    option(
        "--max-holders",
        type=click.IntRange(1, 65536),
        default=DEFAULT_MAX_HOLDERS,
        help="Most holders (agents and nodes) at once; every 64 add 8 bytes to each slot of the index.",
    ),
    option("--advertise-host", default="", help="Host in the URL this prints."),
]


def lookup_options(func: Callable) -> Callable:
    func = auth_tls_options(func)
    for decorator in reversed(LOOKUP_OPTIONS):
        func = decorator(func)
    return func


def settings_from_options(params: dict) -> LookupSettings:
    token, tls = auth_tls_from_options(params)
    settings = LookupSettings(
        host=params["host"],
        port=params["port"],
        http_port=params["http_port"],
        holder_lease=params["holder_lease"],
        rebuild_window=params["rebuild_window"],
        max_query_keys=params["max_query_keys"],
        max_batch_events=params["max_batch_events"],
        max_snapshot_keys=params["max_snapshot_keys"],
        max_holders=params["max_holders"],
        auth_token=token,
        tls=tls,
        advertise_host=params["advertise_host"],
    )
    try:
        settings.validate()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return settings


@click.command("lookup")
@lookup_options
@log_level_option
def lookup(log_level: str, **params) -> None:
    """Run the lookup service: the index of which agent or node holds which chunk.

    Prints its grpc:// URL on the first line of stdout.
    """
    from kvpool.cachenode.server.lookup.server import LookupServer

    settings = settings_from_options(params)
    setup_logging(log_level)
    try:
        server = LookupServer(settings)
    except OSError as exc:
        raise click.ClickException(f"cannot start the lookup service: {exc.strerror or exc}") from None
    stop = stop_on_signals()
    server.start()
    click.echo(server.url)
    sys.stdout.flush()
    log.info("%s", server.summary())
    while not stop.wait(0.5):
        pass
    server.stop()
    log.info("stopped")
