"""Disaggregated prefill without a race: a producer announces the chunks it is storing, and a
consumer waits, bounded, until the pool holds them (docs/disaggregated.md).

A prefill engine (``kv_role: kv_producer``) answers a request before its chunks are stored: they
are stored one step after they were computed, in the background. A router sends the decode
request right after that answer, so the decode engine's lookup could come too early and recompute
the whole prompt. vLLM's routers for disaggregated serving already carry the prefill response's
``kv_transfer_params`` into the decode request; the producer puts an announcement there:

    {"kvpool": {"chunks": N, "key": "<hex of rank 0's chunk key N-1>"}}

Chunk keys are chained (keys.py), so the last announced key stands for the whole prefix, the
model fingerprint, the chunk size, the salt and the adapter: a consumer whose own key N-1 differs
(another model, chunk size or prompt) ignores the announcement instead of waiting in vain. A
consumer that finds fewer than N chunks asks again every ``POLL_S`` until ``announced_wait_ms``
has passed since its first lookup, then loads what is there and computes the rest: a producer
that died before its chunks were stored costs the consumer that bound, never a wrong answer.

Some routers do not carry ``kv_transfer_params`` to the decode request (the production-stack
router's disaggregated mode sends the prompt plus the prefill's first token instead). A
``kv_consumer`` engine's requests are all prefilled elsewhere first, so a request of one without an
announcement waits, within the same bound, for every full chunk of its prompt but the last token
(`expected`); `UnannouncedWaits` turns that off while the producers' chunks never match.

Pure logic: parsing and deciding, no pool and no engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PARAM = "kvpool"
"""The key of kvpool's entry in vLLM's ``kv_transfer_params``."""
POLL_S = 0.005
"""How often a consumer asks the pool again for announced chunks it did not find yet."""
MAX_CHUNKS = 1 << 20
"""Refused above this: no prompt has a million chunks; a bigger number is not an announcement."""


@dataclass(frozen=True)
class Announcement:
    """A producer's word that the first ``chunks`` chunks of this prompt are being stored."""

    chunks: int
    key: bytes  # rank 0's chunk key number chunks - 1

    def params(self) -> dict[str, Any]:
        """The entry for the producer's ``kv_transfer_params``."""
        return {PARAM: {"chunks": self.chunks, "key": self.key.hex()}}


def announce(keys: list[bytes], chunks: int) -> Announcement | None:
    """What a producer announces for a request whose first ``chunks`` chunks (of rank 0's
    ``keys``) are stored or being stored; None when there is nothing to announce."""
    chunks = min(chunks, len(keys))
    return Announcement(chunks, keys[chunks - 1]) if chunks > 0 else None


def read(params: Any) -> Announcement | None:
    """The announcement in a request's ``kv_transfer_params``, or None: absent or malformed
    (anything a client sent that is not a well-formed announcement is ignored, never an error)."""
    if not isinstance(params, Mapping):
        return None
    entry = params.get(PARAM)
    if not isinstance(entry, Mapping):
        return None
    chunks, key = entry.get("chunks"), entry.get("key")
    if type(chunks) is not int or not 0 < chunks <= MAX_CHUNKS or not isinstance(key, str) or len(key) > 128:
        return None
    try:
        raw = bytes.fromhex(key)
    except ValueError:
        return None
    return Announcement(chunks, raw) if raw else None


def applies(ann: Announcement, keys: list[bytes]) -> bool:
    """Whether ``ann`` speaks of this engine's chunks of this prompt (same chained key)."""
    return ann.chunks <= len(keys) and keys[ann.chunks - 1] == ann.key


def expected(
    ann: Announcement | None, keys: list[bytes], prompt_tokens: int, chunk: int, consumer: bool
) -> int:
    """The chunks a request waits for: what its producer announced when the announcement is of
    these very keys; for a consumer's request without one (a router that does not forward
    ``kv_transfer_params``, such as one that sends the prompt plus the prefill's first token), the
    full chunks of all but its last token; 0: none (an announcement of other keys, or kv_both)."""
    if ann is not None:
        return ann.chunks if applies(ann, keys) else 0
    return min(len(keys), max(0, prompt_tokens - 1) // chunk) if consumer else 0


class UnannouncedWaits:
    """A consumer stops waiting for requests without an announcement once several in a row found
    none of their chunks after the whole bound: its producers key chunks differently (another
    parallelism, chunk size or model), and waiting would cost every request the bound. The first
    request that finds a chunk turns waiting back on."""

    def __init__(self, limit: int = 3) -> None:
        self.limit = limit
        self.empty_in_a_row = 0

    @property
    def on(self) -> bool:
        return self.empty_in_a_row < self.limit

    def waited(self, found: int) -> bool:
        """Record a request that waited out the bound having found ``found`` chunks; True when
        this turned waiting off."""
        was_on = self.on
        self.empty_in_a_row = 0 if found else self.empty_in_a_row + 1
        return was_on and not self.on

    def found(self) -> None:
        self.empty_in_a_row = 0


def keep_waiting(expect: int, found: int, limit: int, waited_s: float, bound_s: float) -> bool:
    """Whether a request that found ``found`` chunks asks again rather than loading them: it
    expects more (no more than it may load, ``limit``) and the bound has not passed since its
    first lookup."""
    return found < min(expect, limit) and waited_s < bound_s
