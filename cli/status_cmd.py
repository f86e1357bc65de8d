"""`kvpool status`: what a pool holds, per tier, in a table (or JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from kvpool.cachenode import Client, KVPoolError
from kvpool.cachenode.sizes import format_size

from .options import option


@click.command("status")
@option("--url", default="grpc://127.0.0.1:7400", help="The pool's grpc:// URL.")
@option("--auth-token-file", type=click.Path(dir_okay=False), default=None, help="Bearer token file.")
@option("--tls-ca-file", type=click.Path(dir_okay=False), default=None, help="CA of a grpcs:// pool.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw stats as JSON.")
def status(url: str, auth_token_file: str | None, tls_ca_file: str | None, as_json: bool) -> None:
    """Show a pool's tiers: capacity, usage, entries, hits and misses."""
    token = Path(auth_token_file).read_text().strip() if auth_token_file else None
    try:
        with Client(url, token=token, timeout=5, tls_ca_file=tls_ca_file) as client:
            stats = client.stats()
    except KVPoolError as exc:
        raise click.ClickException(f"{url}: {exc}") from None
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    console = Console()
    console.print(
        f"[bold]{stats.get('node_id', '?')}[/] {url}  version {stats.get('version', '?')}  "
        f"ready={stats.get('ready')}  up {stats.get('uptime_s', 0):.0f} s"
    )
    table = Table("tier", "capacity", "used", "entries", "hits", "misses", "evictions", "state")
    for name, tier in (stats.get("tiers") or {}).items():
        table.add_row(
            name,
            _size(tier.get("capacity")),
            _size(tier.get("used")),
            str(tier.get("entries", "")),
            str(tier.get("hits", "")),
            str(tier.get("misses", "")),
            str(tier.get("evictions", "")),
            "degraded" if tier.get("degraded") else "ok",
        )
    console.print(table)


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)
