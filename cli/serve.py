"""Run a cache node in the foreground until SIGINT/SIGTERM, then stop cleanly (flushing disk writes;
after SIGTERM, handing memory chunks to their new owners first)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.server.node import CacheNode

log = logging.getLogger(__name__)


def serve_node(settings: NodeSettings, *, announce: bool, after_url: str = "") -> None:
    """Start, print the URL (for `kvpool up`; then `after_url`) and block until a stop signal. No
    malloc tuning: values are received into and sent from the L1 arena, never one fresh buffer each."""
    try:
        node = CacheNode(settings)
    except OSError as exc:
        raise click.ClickException(f"cannot start node: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise click.ClickException(f"cannot start node: {exc}") from None
    received: list[int] = []
    stop = stop_on_signals(received)
    # `kvpool up` prints its URL once the disk index is rebuilt: a client may use it at once.
    # `kvpool node` serves health at once (its readiness probe waits for /readyz).
    node.start(wait_ready=announce)
    if announce:
        click.echo(node.url)
        if after_url:
            click.echo(after_url)
        click.echo(node.summary())
    else:
        log.info("%s", node.summary())
    sys.stdout.flush()
    while not stop.wait(0.5):
        pass
    # SIGTERM (Kubernetes scale-down, rolling update) hands memory chunks to their new owners
    # first; SIGINT (Ctrl-C, or `kvpool up --nodes N` stopping the whole pool) stops at once.
    node.stop(handoff=received[:1] == [signal.SIGTERM])
    log.info("stopped; pending disk writes flushed")


def stop_on_signals(received: list[int] | None = None) -> threading.Event:
    """An event that SIGTERM or SIGINT sets (wait on it with a timeout: signals run between waits);
    the signals that arrived are appended to ``received``."""
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        if received is not None:
            received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop
