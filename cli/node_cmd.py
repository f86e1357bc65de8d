"""`kvpool node` and `kvpool up`."""

from __future__ import annotations

import os

import click

from kvpool.cachenode.core.settings import LookupSettings, NodeSettings
from kvpool.cachenode.core.settings.defaults import DEFAULT_LOOKUP_PORT

from .node_options import node_options, settings_from_options, up_options
from .options import PORT, log_level_option, option, setup_logging
from .serve import serve_node
from .up_pool import run_pool


@click.command("node")
@node_options
@log_level_option
def node(log_level: str, **params) -> None:
    """Run one cache node (a StatefulSet member in Kubernetes)."""
    settings = settings_from_options(params)
    setup_logging(log_level)
    serve_node(settings, announce=False)


@click.command("up")
@up_options
@option(
    "--nodes",
    type=click.IntRange(1, 64),
    default=1,
    help="Node processes to run, peered like a cluster behind one URL (1: one node in this process). "
    "--memory and --disk-size are per node.",
)
@option(
    "--lookup-port",
    type=PORT,
    default=DEFAULT_LOOKUP_PORT,
    help="gRPC port of the pool's lookup service, which runs in this process and which the nodes "
    "publish to (0 = a free port; its HTTP port is a free one).",
)
@log_level_option
@click.pass_context
def up(ctx: click.Context, log_level: str, nodes: int, lookup_port: int, **params) -> None:
    """Run a local pool (one node, or --nodes N node processes) with its lookup service; print the
    pool's grpc:// URL, then the lookup service's."""
    settings = settings_from_options(params)
    setup_logging(log_level)
    lookup = start_lookup(settings, lookup_port, params.get("tls_cert_file"))
    settings.lookup_url = lookup.url
    announce = f"lookup service {lookup.url} (http {lookup.http_port})"
    try:
        if nodes == 1:
            serve_node(settings, announce=True, after_url=announce)
        else:
            run_pool(ctx, settings, nodes, params, after_url=announce)
    finally:
        lookup.stop()


def start_lookup(settings: NodeSettings, port: int, cert_file=None):
    """The lookup service of `kvpool up`, in this process: the pool's own bind address, auth and
    TLS; authoritative at once (every holder starts with it, nothing to rebuild)."""
    from kvpool.cachenode.server.lookup.server import LookupServer

    lookup_settings = LookupSettings(
        host=settings.host,
        port=port,
        http_port=0,
        rebuild_window=0.0,
        auth_token=settings.auth_token,
        tls=settings.tls,
        advertise_host=settings.advertise_host,
    )
    if settings.tls is not None and cert_file:
        # the nodes verify the lookup service's certificate: the pool's own, unless told otherwise
        os.environ.setdefault("KVPOOL_TLS_CA_FILE", str(cert_file))
    try:
        server = LookupServer(lookup_settings)
    except OSError as exc:
        raise click.ClickException(
            f"cannot start the lookup service on port {port}: {exc.strerror or exc} (see --lookup-port)"
        ) from None
    server.start()
    return server
