"""Why a request's prompt tokens were not loaded from the pool: a reason for every token.

Pure (plain values in, token counts out), so that the accounting is tested without an engine. The
scheduler side classifies a request once, when vLLM schedules it (``classify``: what the lookup
found and what vLLM takes), and again for the part of its load that failed (``failed_load``: what
the workers reported). Every prompt token is then exactly one of:

* ``local``: vLLM had it in its own prefix cache (not the pool's business, not a miss);
* loaded from the pool (``to_load``, less what ``failed_load`` later reports);
* ``final``: the pool holds it, but vLLM computes it anyway: at least one prompt token is computed
  to produce the first logits, so a fully cached prompt loads up to the last block boundary before
  its last token (not a miss: nothing a cache could do);
* a miss, counted under a ``(reason, detail)`` pair of the bounded sets below.

so ``local + loaded + final + sum(misses) == prompt tokens``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

NOT_IN_POOL = "not_in_pool"  # the lookup answered: the pool does not hold the chunk
EVICTED = "evicted"  # the lookup found the chunk, the load found it gone (evicted, deleted, node lost)
REFUSED = "refused"  # the connector does not cache this request (detail: which feature)
LOAD_FAILED = "load_failed"  # the load of a found chunk failed (detail: which error)
POOL_UNREACHABLE = "pool_unreachable"  # the lookup got no answer (detail: why)
PARTIAL_BLOCK = "partial_block"  # the prompt's tail after its last full chunk: never cached

#: Every label value, with its bounded set of details ("" = none). Stable: dashboards and alerts
#: name them (docs/connector.md, "Why a request missed").
DETAILS: dict[str, tuple[str, ...]] = {
    NOT_IN_POOL: ("",),
    EVICTED: ("",),
    REFUSED: (
        "engine",
        "load_off",
        "lora",
        "multimodal",
        "prompt_embeds",
        "unkeyable",
        "vllm_skipped",
        "other",
    ),
    LOAD_FAILED: ("corrupt", "format_version", "timeout", "pool_error", "breaker_open", "device", "internal"),
    POOL_UNREACHABLE: ("breaker_open", "no_pool", "timeout", "error"),
    PARTIAL_BLOCK: ("",),
}
REASONS = tuple(DETAILS)
_FALLBACK = {REFUSED: "other", LOAD_FAILED: "internal", POOL_UNREACHABLE: "error"}

#: What a worker reports for a chunk that failed to load → (reason, detail).
LOAD_FAILURES: dict[str, tuple[str, str]] = {
    "evicted": (EVICTED, ""),
    **{d: (LOAD_FAILED, d) for d in DETAILS[LOAD_FAILED]},
}


def label(reason: str, detail: str = "") -> str:
    """``reason`` or ``reason:detail``: the key of a miss in counters and log lines. An unknown
    detail becomes the reason's catch-all (``refused:other``, ``load_failed:internal``,
    ``pool_unreachable:error``, none for the others), so the label set stays bounded."""
    if reason not in DETAILS:
        raise ValueError(f"unknown miss reason {reason!r}")
    if detail not in DETAILS[reason]:
        detail = _FALLBACK.get(reason, "")
    return f"{reason}:{detail}" if detail else reason


def split_label(key: str) -> tuple[str, str]:
    """The ``(reason, detail)`` of a ``label``."""
    reason, _, detail = key.partition(":")
    return reason, detail


def all_labels() -> list[tuple[str, str]]:
    """Every (reason, detail) pair: the series a dashboard can show at 0 from the start."""
    return [(r, d) for r, details in DETAILS.items() for d in details]


@dataclass(frozen=True)
class Answer:
    """What the scheduler side knew of one request when vLLM scheduled it.

    ``local`` tokens vLLM had itself; ``load_end``: the connector loads tokens [local, load_end)
    (``load_end == local``: nothing); ``pool_chunks``: leading full chunks the lookup found (every
    rank's shard); ``unreachable``: why the lookup got no answer (a ``POOL_UNREACHABLE`` detail);
    ``refused``: the ``REFUSED`` detail when the connector does not cache the request at all;
    ``declined``: the ``REFUSED`` detail of tokens the pool held and was not asked to load (vLLM
    skipped the connector's tokens); ``limit``: the most tokens a load may cover (the last block
    boundary before the last prompt token)."""

    prompt_tokens: int
    chunk_size: int
    local: int = 0
    load_end: int = 0
    pool_chunks: int = 0
    limit: int | None = None
    unreachable: str | None = None
    refused: str | None = None
    declined: str | None = None


@dataclass
class Breakdown:
    prompt_tokens: int
    local: int = 0
    to_load: int = 0
    final: int = 0
    misses: dict[str, int] = field(default_factory=dict)  # label → tokens

    def add(self, key: str, n: int) -> None:
        if n > 0:
            self.misses[key] = self.misses.get(key, 0) + n

    @property
    def missed(self) -> int:
        return sum(self.misses.values())


def classify(a: Answer) -> Breakdown:
    """A reason for every prompt token of one request (see the module's docstring)."""
    p, c = a.prompt_tokens, a.chunk_size
    local = max(0, min(a.local, p))
    out = Breakdown(prompt_tokens=p, local=local)
    if a.refused is not None:
        out.add(label(REFUSED, a.refused), p - local)
        return out
    load_end = max(local, min(a.load_end, p))
    out.to_load = load_end - local
    full = p // c * c  # tokens of the full chunks: the rest can never be cached
    pool_end = min(max(0, a.pool_chunks) * c, full)
    limit = p if a.limit is None else max(0, min(a.limit, p))
    pos = load_end
    # in the pool, not loaded: up to the load limit vLLM declined them, past it vLLM must compute them
    held_end = max(pos, pool_end)
    declined = max(0, min(held_end, limit) - pos)
    out.add(label(REFUSED, a.declined or "vllm_skipped"), declined)
    out.final = held_end - pos - declined
    pos = held_end
    # not in the pool's answer: the full chunks it lacks, then the partial tail
    if pos < full:
        reason = label(POOL_UNREACHABLE, a.unreachable) if a.unreachable else NOT_IN_POOL
        out.add(reason, full - pos)
        pos = full
    out.add(PARTIAL_BLOCK, p - pos)
    return out


def failed_load(start: int, end: int, failed_from: int, why: str) -> dict[str, int]:
    """Tokens of a load of [start, end) that failed from ``failed_from`` on (vLLM recomputes them),
    under the reason the worker reported (``LOAD_FAILURES``; unknown → ``load_failed:internal``)."""
    n = end - max(start, min(failed_from, end))
    if n <= 0:
        return {}
    reason, detail = LOAD_FAILURES.get(why, (LOAD_FAILED, "internal"))
    return {label(reason, detail): n}


def describe(misses: Mapping[str, int]) -> str:
    """``missed 74: not_in_pool 64, partial_block 10`` (largest first), or "" when none."""
    total = sum(misses.values())
    if not total:
        return ""
    parts = sorted(((n, k) for k, n in misses.items() if n), key=lambda x: (-x[0], x[1]))
    return f"missed {total}: " + ", ".join(f"{k} {n}" for n, k in parts)


def pool_error_kind(exc: BaseException) -> str:
    """A pool call's exception as a bounded detail: ``timeout`` or ``error``."""
    text = str(exc).lower()
    if isinstance(exc, TimeoutError) or "deadline" in text or "timed out" in text:
        return "timeout"
    return "error"
