"""`kvpool up --nodes N`: N `kvpool node` processes on this machine, peered like a cluster.

Each node is a real `kvpool node` process with its own id (`<node-id>-<i>`, default `up-<i>`), its
own ports (node 0 takes `--port/--http-port/--data-port`, the others free ports) and, with
`--disk-dir`, its own subdirectory `node-<i>`; `--peers` names every other node, as the headless
Service does in Kubernetes. Every other setting reaches the nodes through its `KVPOOL_<FLAG>`
variable; `--lookup-url` names the lookup service `up` runs. The printed URL is node 0's; a client
given it learns the others (DESIGN.md §1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from kvpool.cachenode import Client, KVPoolError
from kvpool.cachenode.core.settings import NodeSettings
from kvpool.cachenode.core.sizes import format_size
from kvpool.cli.devtools.local_servers import free_port, wait_port

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
PER_NODE = ("port", "http_port", "data_port", "node_id", "disk_dir", "peers")


def node_env(ctx: click.Context, params: dict) -> dict[str, str]:
    """The parent's parsed settings as KVPOOL_<FLAG> variables for the child nodes."""
    env = dict(os.environ)
    for param in ctx.command.params:
        envvar = getattr(param, "envvar", None)
        if not isinstance(envvar, str) or param.name in (*PER_NODE, "nodes"):
            continue
        value = ctx.params.get(param.name, params.get(param.name))
        if value is None:
            env.pop(envvar, None)
        elif isinstance(value, bool):
            env[envvar] = "1" if value else "0"
        else:
            env[envvar] = str(value)
    return env


def run_pool(
    ctx: click.Context, settings: NodeSettings, nodes: int, params: dict, *, after_url: str = ""
) -> None:
    """Start the nodes, print node 0's URL once every node is ready, stop them on SIGTERM/SIGINT."""
    host = settings.host if settings.host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    base_id = settings.node_id or "up"
    ports = []
    for i in range(nodes):
        if i == 0:
            ports.append(
                tuple(p or free_port() for p in (settings.port, settings.http_port, settings.data_port))
            )
        else:
            ports.append((free_port(), free_port(), free_port()))
    addresses = [f"{host}:{grpc}" for grpc, _, _ in ports]
    env = node_env(ctx, params)
    procs: list[subprocess.Popen] = []
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i, (grpc_port, http_port, data_port) in enumerate(ports):
            child = {
                **env,
                "KVPOOL_PORT": str(grpc_port),
                "KVPOOL_HTTP_PORT": str(http_port),
                "KVPOOL_DATA_PORT": str(data_port),
                "KVPOOL_NODE_ID": f"{base_id}-{i}",
                "KVPOOL_PEERS": ",".join(a for j, a in enumerate(addresses) if j != i),
            }
            if settings.lookup_url:
                child["KVPOOL_LOOKUP_URL"] = settings.lookup_url
            child.pop("KVPOOL_DISK_DIR", None)
            if settings.disk_dir is not None:
                child["KVPOOL_DISK_DIR"] = str(Path(settings.disk_dir) / f"node-{i}")
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-P", "-m", "kvpool.cli.main", "node"],
                    env=child,
                    start_new_session=True,  # Ctrl-C reaches the parent only; it stops the nodes in order
                )
            )
        url = _wait_ready(procs, ports, addresses[0], settings, nodes, stop, params.get("tls_cert_file"))
        if url is None:
            return
        click.echo(url)
        if after_url:
            click.echo(after_url)
        click.echo(
            f"kvpool pool of {nodes} nodes ({', '.join(f'{base_id}-{i} {a}' for i, a in enumerate(addresses))}), "
            f"replication factor {settings.replication_factor}; each node: memory {format_size(settings.memory)}"
        )
        sys.stdout.flush()
        reported: set[int] = set()
        while not stop.wait(0.5):
            for i, proc in enumerate(procs):
                if proc.poll() is not None and i not in reported:
                    reported.add(i)
                    log.error(
                        "node %s-%d exited with code %s; the others keep serving", base_id, i, proc.returncode
                    )
            if len(reported) == len(procs):
                raise click.ClickException("every node exited")
    finally:
        _stop_all(procs)


def _wait_ready(
    procs, ports, first: str, settings: NodeSettings, nodes: int, stop: threading.Event, cert_file
) -> str | None:
    """Node 0's URL once it sees all `nodes` members ready (so a client's first view is whole)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    for proc, (grpc_port, _, _) in zip(procs, ports, strict=True):
        try:
            wait_port(grpc_port, timeout=max(1.0, deadline - time.monotonic()), proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise click.ClickException(f"a node did not start: {exc}") from None
    scheme = "grpcs" if settings.tls else "grpc"
    url = f"{scheme}://{first}"
    token = settings.auth_token
    ca = (os.environ.get("KVPOOL_TLS_CA_FILE") or str(cert_file)) if settings.tls else None
    while time.monotonic() < deadline and not stop.is_set():
        with (
            contextlib.suppress(KVPoolError),
            Client(url, token=token, timeout=2, tls_ca_file=ca, transport="grpc") as client,
        ):
            if sum(1 for m in client.members() if m["state"] == "ready") >= nodes:
                return url
        if any(p.poll() is not None for p in procs):
            raise click.ClickException("a node exited during start-up")
        time.sleep(0.2)
    if stop.is_set():
        return None
    raise click.ClickException(f"the {nodes} nodes did not all become ready within {READY_TIMEOUT_S:.0f} s")


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """SIGINT every node at once: the whole pool stops, so no node hands chunks to another (that
    is SIGTERM's job); each still flushes its disk writes. SIGKILL what outlives the wait."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
