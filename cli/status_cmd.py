"""`kvpool status`: every node of a pool (state, usage against budget, keys, hits, misses) and the
pool's totals per tier, in tables (or the raw stats as JSON); for a lookup service, its index
(holders, entries, event lag)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from kvpool.cachenode import Client, KVPoolError
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cachenode.core.errors import NotALookupService
from kvpool.cachenode.core.sizes import format_size

from .options import option


@click.command("status")
@option(
    "--url",
    default="grpc://127.0.0.1:7400",
    help="The grpc:// URL of a pool (any node, the pool's Service, or a comma list of nodes) or of a lookup service.",
)
@option("--auth-token-file", type=click.Path(dir_okay=False), default=None, help="Bearer token file.")
@option("--tls-ca-file", type=click.Path(dir_okay=False), default=None, help="CA of a grpcs:// pool.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw stats as JSON.")
def status(url: str, auth_token_file: str | None, tls_ca_file: str | None, as_json: bool) -> None:
    """Show a pool's nodes and tiers (state, capacity, usage, keys, hits, misses), or a lookup
    service's index."""
    token = Path(auth_token_file).read_text().strip() if auth_token_file else None
    try:
        stats = _fetch(url, token, tls_ca_file)
    except KVPoolError as exc:
        raise click.ClickException(f"{url}: {exc}") from None
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
    elif stats.get("service") == "lookup":
        _print_lookup(url, stats)
    else:
        _print_node(url, stats)


def _fetch(url: str, token: str | None, tls_ca_file: str | None) -> dict:
    """A lookup service's stats when one answers at ``url``, else the pool's."""
    if "," not in url:  # a list of URLs is always a pool
        try:
            with LookupClient(url, token=token, timeout=5, tls_ca_file=tls_ca_file) as lookup:
                return lookup.stats()
        except NotALookupService:
            pass
    with Client(url, token=token, timeout=5, tls_ca_file=tls_ca_file, transport="grpc") as client:
        return client.stats()


def _print_node(url: str, stats: dict) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)  # pipes get whole rows
    console.print(
        f"[bold]pool[/] {url}  {stats['members_up']} of {stats['members']} nodes answering, "
        f"replication factor {stats['replication_factor']}, version {stats.get('version', '?')}, "
        f"ready={stats['ready']}"
    )
    nodes = Table(
        "node", "state", "url", "memory used / budget", "keys", "disk used / budget", "keys", "hits", "misses"
    )
    for node_id, node in stats["nodes"].items():
        tiers = node.get("tiers") or {}
        hits, misses = node_hits_misses(tiers)
        memory, disk = tiers.get("memory") or {}, tiers.get("disk") or {}
        nodes.add_row(
            node_id,
            node["state"],
            node["url"],
            _usage(memory),
            _count(memory.get("entries")),
            _usage(disk),
            _count(disk.get("entries")),
            _count(hits),
            _count(misses),
        )
    console.print(nodes)
    table = Table("tier (pool total)", "capacity", "used", "entries", "hits", "misses", "evictions", "state")
    for name, tier in (stats.get("tiers") or {}).items():
        table.add_row(
            name,
            _size(tier.get("capacity")),
            _size(tier.get("used")),
            _count(tier.get("entries")),
            _count(tier.get("hits")),
            _count(tier.get("misses")),
            _count(tier.get("evictions")),
            "degraded" if tier.get("degraded") else "ok",
        )
    console.print(table)


def _print_lookup(url: str, stats: dict) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    per_entry = stats.get("bytes_per_entry")
    console.print(
        f"[bold]lookup[/] {url}  version {stats.get('version', '?')}  "
        f"authoritative={stats.get('authoritative')}  up {stats.get('uptime_s', 0):.0f} s  "
        f"lease {stats.get('holder_lease_s')} s"
    )
    console.print(
        f"{len(stats.get('holders') or [])} holders, {stats.get('keys', 0)} keys, {stats.get('entries', 0)} entries, "
        f"index {_size(stats.get('index_bytes'))}"
        + (f" ({per_entry} B per entry)" if per_entry else "")
        + f", max event lag {stats.get('max_event_lag_s', 0) * 1000:.1f} ms, "
        f"{stats.get('pending_events', 0)} events waiting at holders"
    )
    table = Table("holder", "kind", "tier", "address", "entries", "seq", "event lag", "waiting", "lease left")
    for h in stats.get("holders") or []:
        table.add_row(
            h["holder_id"],
            h["kind"],
            h["tier"],
            h["address"] or "-",
            str(h["entries"]),
            str(h["last_seq"]) + ("" if h.get("synced", True) else " (resync due)"),
            f"{h['event_lag_s'] * 1000:.1f} ms",
            str(h["pending_events"]),
            f"{h['lease_left_s']:.1f} s",
        )
    console.print(table)


def node_hits_misses(tiers: dict) -> tuple[int | None, int | None]:
    """Lookups a node answered and could not: every lookup starts in memory, and each hit in a
    lower tier was a memory miss that the node still answered."""
    memory = tiers.get("memory")
    if not memory:
        return None, None
    lower_hits = sum((t.get("hits") or 0) for name, t in tiers.items() if name != "memory")
    return memory.get("hits", 0) + lower_hits, memory.get("misses", 0) - lower_hits


def _usage(tier: dict | None) -> str:
    if not tier:
        return "-"
    return f"{_size(tier.get('used'))} / {_size(tier.get('capacity'))}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(value)
