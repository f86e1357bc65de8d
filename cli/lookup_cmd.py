"""`kvpool lookup`: the pool's P2P lookup service (which agent or node holds which chunk)."""

from __future__ import annotations

import logging
import sys

import click

from kvpool.cachenode.core import settings as registry
from kvpool.cachenode.core.settings import LookupSettings

from .node_options import auth_tls_from_options, lookup_options
from .options import log_level_option, setup_logging
from .serve import stop_on_signals

log = logging.getLogger(__name__)


def settings_from_options(params: dict) -> LookupSettings:
    """Build and validate settings; raises click.BadParameter/UsageError (exit code 2)."""
    token, tls = auth_tls_from_options(params)
    try:
        return registry.lookup_settings(params, auth_token=token, tls=tls)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


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
