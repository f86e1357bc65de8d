"""Finding vLLM in a container's command line: the server, its flags, and what the webhook may change.

Pure. A container runs vLLM when its command plus args hold `vllm serve …` or
`python -m vllm.entrypoints.openai.api_server …` (any `python*` or path to one). A shell line
(`sh -c "vllm serve …"`) is recognised but never rewritten: appending to a script is not safe.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
from typing import Any

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
TRANSFER_CONFIG_FLAGS = ("--kv-transfer-config", "--kv_transfer_config")
BLOCK_SIZE_FLAGS = ("--block-size", "--block_size")
SHUTDOWN_TIMEOUT_FLAGS = ("--shutdown-timeout", "--shutdown_timeout")
_SHELLS = {"sh", "bash", "dash", "ash", "zsh"}
_LAUNCHERS = {"env", "tini", "dumb-init"}
_PYTHON = re.compile(r"^python[0-9.]*$")
_IN_SCRIPT = re.compile(
    r"(^|[\s;&|/])(vllm\s+serve\b|python[0-9.]*\s+-m\s+vllm\.entrypoints\.openai\.api_server\b)"
)


@dataclasses.dataclass(frozen=True)
class VllmCommand:
    """What the webhook learned from one container's command line."""

    argv: tuple[str, ...]
    """command + args as the kubelet runs them (without the image's entrypoint)."""
    start: int
    """Index of the first vLLM option in argv (after `serve` or the module name)."""

    @property
    def options(self) -> tuple[str, ...]:
        return self.argv[self.start :]

    def value(self, flags: tuple[str, ...]) -> str | None:
        """The value of the last of `flags` given (`--flag v` or `--flag=v`); None when absent."""
        found = None
        opts = self.options
        for i, word in enumerate(opts):
            for flag in flags:
                if word == flag and i + 1 < len(opts):
                    found = opts[i + 1]
                elif word.startswith(flag + "="):
                    found = word[len(flag) + 1 :]
        return found

    def has(self, flags: tuple[str, ...]) -> bool:
        return any(w in flags or w.split("=", 1)[0] in flags for w in self.options)


def argv(container: dict[str, Any]) -> list[str]:
    return [str(w) for w in (container.get("command") or [])] + [
        str(w) for w in (container.get("args") or [])
    ]


def _start(words: list[str]) -> int | None:
    """Where vLLM's own options begin in `words`, or None when they do not run vLLM.

    vLLM must be the program that runs: first, or after launchers that exec it (`env A=b`,
    `tini --`, `dumb-init --`)."""
    for i, word in enumerate(words):
        name = posixpath.basename(word)
        if name == "vllm" and words[i + 1 : i + 2] == ["serve"]:
            return i + 2
        if _PYTHON.match(name) and words[i + 1 : i + 3] == ["-m", API_SERVER_MODULE]:
            return i + 3
        if name in _LAUNCHERS or word == "--" or ("=" in word and not word.startswith("-") and i > 0):
            continue
        return None
    return None


def parse(container: dict[str, Any]) -> VllmCommand | None:
    """The container's vLLM command line, or None when it runs no vLLM server directly."""
    words = argv(container)
    start = _start(words)
    return None if start is None else VllmCommand(tuple(words), start)


def shell_wrapped(container: dict[str, Any]) -> bool:
    """Whether the container starts vLLM inside a shell line (`sh -c "… vllm serve …"`)."""
    words = argv(container)
    if not words or posixpath.basename(words[0]) not in _SHELLS:
        return False
    return any(_IN_SCRIPT.search(w) for w in words[1:])
