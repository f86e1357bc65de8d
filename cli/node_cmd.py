"""`kvpool node` and `kvpool up`."""

from __future__ import annotations

import click

from .node_options import node_options, settings_from_options
from .options import log_level_option, setup_logging
from .serve import serve_node


@click.command("node")
@node_options
@log_level_option
def node(log_level: str, **params) -> None:
    """Run one cache node (a StatefulSet member in Kubernetes)."""
    settings = settings_from_options(params)
    setup_logging(log_level)
    serve_node(settings, announce=False)


@click.command("up")
@node_options
@log_level_option
def up(log_level: str, **params) -> None:
    """Run an all-in-one local pool in this process and print its grpc:// URL."""
    settings = settings_from_options(params)
    setup_logging(log_level)
    serve_node(settings, announce=True)
