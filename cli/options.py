"""Shared click building blocks: every flag also reads KVPOOL_<NAME>, sizes parse strictly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import click

from kvpool.cachenode.core.sizes import parse_size


class SizeType(click.ParamType):
    """A byte size such as 512MiB or 4GiB."""

    name = "size"

    def convert(self, value: Any, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()
PORT = click.IntRange(0, 65535)


def env_name(flag: str) -> str:
    return "KVPOOL_" + flag.lstrip("-").replace("-", "_").upper()


def option(flag: str, *decls: str, **kwargs: Any) -> Callable:
    """click.option with the contract's env var (KVPOOL_<FLAG>) and it shown in --help."""
    kwargs.setdefault("envvar", env_name(flag))
    kwargs.setdefault("show_envvar", True)
    return click.option(flag, *decls, **kwargs)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


log_level_option = option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    help="Log verbosity.",
)
