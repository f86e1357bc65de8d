"""`kvpool agent`: the vLLM pod's sidecar (cachenode/server/agent/, docs/agent.md)."""

from __future__ import annotations

import logging
import sys

import click

from .node_options import agent_options, agent_settings_from_options
from .options import log_level_option, setup_logging
from .serve import stop_on_signals

log = logging.getLogger(__name__)


@click.command("agent")
@agent_options
@log_level_option
def agent(log_level: str, **params) -> None:
    """Run the agent: a shared-memory arena for the connector in this pod, shared with peer agents
    (found through --lookup-url) and backed by the cache nodes (--pool-url).

    Prints its grpc:// URL on the first line of stdout once it serves.
    """
    from kvpool.cachenode.server.agent.server import AgentServer

    settings = agent_settings_from_options(params)
    setup_logging(log_level)
    try:
        server = AgentServer(settings)
    except OSError as exc:
        raise click.ClickException(f"cannot start the agent: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise click.ClickException(f"cannot start the agent: {exc}") from None
    stop = stop_on_signals()
    server.start(wait_ready=True)
    click.echo(server.url)
    sys.stdout.flush()
    log.info("%s", server.summary())
    while not stop.wait(0.5):
        pass
    server.stop()
    log.info("stopped; chunks queued for the cache nodes flushed (or dropped after 5 s)")
