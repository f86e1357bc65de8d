"""Run a cache node in the foreground until SIGINT/SIGTERM, then stop cleanly (flushing disk writes)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from kvpool.cachenode.node import CacheNode
from kvpool.cachenode.settings import NodeSettings
from kvpool.cachenode.tuning import tune_malloc_for_large_buffers

log = logging.getLogger("kvpool")


def serve_node(settings: NodeSettings, *, announce: bool) -> None:
    """Start, print the URL (for `kvpool up`) and block until a stop signal."""
    tune_malloc_for_large_buffers()
    try:
        node = CacheNode(settings)
    except OSError as exc:
        raise click.ClickException(f"cannot start node: {exc.strerror or exc}") from None
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start(wait_ready=False)
    if announce:
        click.echo(node.url)
        click.echo(node.summary())
    else:
        log.info("%s", node.summary())
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    node.stop()
    log.info("stopped; pending disk writes flushed")
