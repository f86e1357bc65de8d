"""`kvpool bench`: the benchmarks, one module each, imported only when one of them is asked for.

`kvpool --help` and every other command load none of them: the group below knows each bench by
name and "module:attribute" and imports the module when click asks for that command (running it,
its --help, or `kvpool bench --help`, which lists their one-line summaries). This module stays
light: click only.
"""

from __future__ import annotations

import importlib

import click

COMMANDS: dict[str, str] = {
    "copy": "kvpool.cli.bench.copy:copy_cmd",
    "disk": "kvpool.cli.bench.disk:disk",
    "lookup": "kvpool.cli.bench.lookup:lookup",
    "node": "kvpool.cli.bench.node:node",
    "p2p": "kvpool.cli.bench.p2p:p2p",
    "pd": "kvpool.cli.bench.pd:pd",
    "pool": "kvpool.cli.bench.pool:pool",
    "soak": "kvpool.cli.bench.soak:soak",
    "tiers": "kvpool.cli.bench.tiers:tiers",
    "ttft": "kvpool.cli.bench.ttft:ttft",
}
"""Command name -> "module:attribute" of its click command."""


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use (click's documented lazy-loading pattern)."""

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            return self._load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, cmd_name: str) -> click.Command:
        module_name, _, attribute = self.lazy_commands[cmd_name].partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}:{attribute} is {type(command).__name__}, not a click command")
        return command


@click.group("bench", cls=LazyGroup, lazy_commands=COMMANDS)
def bench() -> None:
    """Benchmarks that print their same-run baselines and ratios (--json for one JSON line)."""
