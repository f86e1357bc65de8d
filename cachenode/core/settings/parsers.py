"""Parsers of setting values: text (a flag, an env value, an extra_config entry) → value.

Each raises ValueError saying what is wrong, so a flag, the operator and the connector report a bad
value the same way. Pure: the node's own URL and peer parsers check, nothing is resolved.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpool.cachenode.core.errors import InvalidRequest
from kvpool.cachenode.core.settings.defaults import DEFAULT_GRPC_PORT
from kvpool.cachenode.core.sizes import parse_size
from kvpool.cachenode.core.urls import parse_peers, parse_url, parse_urls

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def text(value: Any) -> str:
    return str(value)


def path(value: Any) -> Path:
    if not str(value).strip():
        raise ValueError("must not be empty")
    return Path(value)


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (true or false)")


def lenient_boolean(value: Any) -> bool:
    """On for 1/true/yes/on, off for anything else: how the connector has always read its switches
    (an engine started with a misspelt word keeps running, with the switch off)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in _TRUE


def auto_or_boolean(value: Any) -> str:
    """ "auto", or a boolean as "true"/"false" (a switch whose default depends on other settings)."""
    word = str(value).strip().lower()
    if word == "auto":
        return "auto"
    if isinstance(value, bool) or word in _TRUE + _FALSE:
        return "true" if lenient_boolean(value) else "false"
    raise ValueError(f"must be auto, true or false, got {value!r}")


def integer(low: int, high: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        try:
            n = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"{value!r} is not a whole number") from None
        if isinstance(n, bool) or not low <= n <= high:
            raise ValueError(f"must be between {low} and {high}, got {value!r}")
        return n

    return parse


def number(low: float, high: float, *, low_open: bool = False) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number") from None
        if not (low < x if low_open else low <= x) or x > high:
            bound = f"above {low}" if low_open else f"at least {low}"
            raise ValueError(f"must be {bound} and at most {high}, got {value!r}")
        return x

    return parse


def size(value: Any) -> int:
    return parse_size(value)


def positive_size(value: Any) -> int:
    n = parse_size(value)
    if n <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return n


port = integer(0, 65535)


def file_mode(value: Any) -> int:
    """An octal permission mode that keeps the owner's read and write and grants no execute."""
    try:
        mode = value if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip(), 8)
    except ValueError:
        raise ValueError(f"{value!r} is not an octal file mode such as 0660") from None
    if mode & ~0o666 or mode & 0o600 != 0o600:
        raise ValueError(
            f"must give the owner read and write and nobody execute (0600 to 0666), got {value!r}"
        )
    return mode


def peers(value: Any) -> str:
    """A comma list of node URLs or host:port, or one DNS name (parsed as the node parses it)."""
    spec = str(value).strip()
    try:
        parse_peers(spec, DEFAULT_GRPC_PORT)
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from None
    return spec


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        word = str(value).strip().lower()
        if word not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return word

    return parse


def grpc_url(value: Any) -> str:
    """One grpc:// or grpcs:// URL (the lookup service)."""
    try:
        parse_url(str(value))
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from None
    return str(value).strip()


def pool_url(value: Any) -> str:
    """A pool: one URL, or a comma list of node URLs (all grpc:// or all grpcs://)."""
    try:
        parse_urls(str(value))
    except InvalidRequest as exc:
        raise ValueError(str(exc)) from None
    return str(value).strip()


def checked(parse: Callable[[Any], object]) -> Callable[[Any], str]:
    """A parser that checks text with a node parser and keeps the text (URLs, names, lists)."""

    def check(value: Any) -> str:
        parse(value)
        return str(value)

    return check
