"""One setting: its name, default, help and parser, and who reads it (a command's flag, a client).

The flag (`--<name>`) and the env var (`KVPOOL_<NAME>`) follow from the name, so no reader can
spell either differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvpool.cachenode.core.settings.parsers import text as parse_text

NODE, UP, AGENT, LOOKUP = "node", "up", "agent", "lookup"
"""Commands whose flags a setting is (`commands`)."""
CLIENT = "client"
"""Reader of settings that pods of an engine get (`readers`): the connector or `Client`."""


@dataclass(frozen=True)
class Setting:
    """One setting. `default` is written as a user would type it; `parse` turns such text into the
    value (and raises ValueError for anything the reader refuses)."""

    name: str
    default: Any
    help: str
    parse: Callable[[Any], Any] = parse_text
    group: str = "node"
    kind: str = "text"
    """What the value is, for --help and the docs: text, size, int, number, port, path, bool, list, URL, mode."""
    commands: frozenset[str] = frozenset({NODE, UP})
    readers: frozenset[str] = frozenset({NODE})
    secret: bool = False
    """Never shown, never put in a ConfigMap (a Secret carries it)."""
    negatable: bool = False
    """A boolean with `--x/--no-x` flags."""
    flag_name: str | None = None
    """The flag when it is not `--<name>` with dashes (settings read only by clients)."""
    command_defaults: tuple[tuple[str, Any], ...] = field(default=())
    """(command or reader, default) where its default differs from `default` (the agent's ports,
    the connector's embedded pool)."""

    def default_for(self, command: str | None) -> Any:
        """The default as a user would type it, for `command`'s flag (or a reader such as CLIENT)."""
        return dict(self.command_defaults).get(command, self.default)

    @property
    def flag(self) -> str:
        """`--<name>`; empty for a setting that has no flag of its own (read from env or extra_config)."""
        return self.flag_name if self.flag_name is not None else "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "KVPOOL_" + self.name.upper()

    def value(self, raw: Any) -> Any:
        """The parsed value of `raw` (None stays None: the setting is unset)."""
        return None if raw is None else self.parse(raw)

    @property
    def default_value(self) -> Any:
        return self.value(self.default)

    def text(self, value: Any) -> str:
        """A value as the text of its env var (what a ConfigMap holds)."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list | tuple):
            return ",".join(map(str, value))
        if self.kind == "mode" and isinstance(value, int):
            return f"{value:04o}"
        return str(value)


NODE_AND_CLIENT = frozenset({NODE, CLIENT})
CLIENT_ONLY = frozenset({CLIENT})
SERVERS = frozenset({NODE, UP, AGENT})
"""Settings that mean the same for a node and an agent (which serves the node's API to its peers)."""
NODE_AND_AGENT = frozenset({NODE, AGENT})
AGENT_ONLY = frozenset({AGENT})
LOOKUP_ONLY = frozenset({LOOKUP})
