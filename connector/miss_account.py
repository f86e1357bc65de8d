"""The scheduler side's miss accounting: one request's state → its miss reasons (miss_reasons.py),
counted in ``kvpool_connector_miss_tokens_total{reason, detail}`` and written into its hit-log line.

A request is classified once, when vLLM first schedules it (``update_state_after_alloc``): what
the lookup found, what vLLM had itself and what it takes from the pool are known then. The part of
its load that the workers report failed is counted when their aggregated report arrives
(``count_failed_load``), so a rank's failure counts once whatever the number of ranks. A request
that loads logs its line on each worker (``Retrieved … ; missed …``, worker.py); one that loads
nothing logs it here.
"""

from __future__ import annotations

from vllm.logger import init_logger

from . import metrics, miss_reasons
from .miss_reasons import Answer
from .request_state import RequestState

log = init_logger(__name__)


def refusal(st: RequestState, load_on: bool) -> str | None:
    """The ``refused`` detail of a request the connector does not load at all, else None."""
    if st.refused:
        return st.refused_feature or "other"
    return None if load_on else "load_off"


def classify_request(
    st: RequestState,
    *,
    chunk_size: int,
    block_size: int,
    load_on: bool,
    declined: bool,
    pool_name: str,
) -> dict[str, int]:
    """Count ``st``'s misses now (vLLM scheduled it; ``st.load`` is what it loads, if anything;
    ``declined``: vLLM took none of the tokens offered). Returns them (label → tokens)."""
    local, end = st.load if st.load is not None else (st.local, st.local)
    b = miss_reasons.classify(
        Answer(
            prompt_tokens=st.prompt_tokens,
            chunk_size=chunk_size,
            local=local,
            load_end=end,
            pool_chunks=st.pool_chunks,
            limit=(st.prompt_tokens - 1) // block_size * block_size,  # as scheduler._hit_tokens
            unreachable=st.unreachable,
            refused=refusal(st, load_on),
            declined="vllm_skipped" if declined else None,
        )
    )
    metrics.STATS.add_misses(b.misses)
    if end <= local and b.misses:  # nothing to load: no worker logs a line for it
        log.info(
            "Retrieved 0 of %d tokens from %s; %s%s",
            st.prompt_tokens, pool_name, miss_reasons.describe(b.misses),
            f" ({b.local} in vLLM's prefix cache)" if b.local else "",
        )  # fmt: skip
    return b.misses


def count_refused_engine(prompt_tokens: int, local: int) -> None:
    """A request of an engine the connector refused (cache off): every token it computes."""
    metrics.STATS.add_misses({miss_reasons.label(miss_reasons.REFUSED, "engine"): prompt_tokens - local})


def count_failed_load(st: RequestState, failed_chunk: int, why: str, chunk_size: int) -> None:
    """The workers reported ``st``'s load failed from ``failed_chunk`` on (``why``: the first
    failed chunk's reason): those tokens are recomputed, counted once."""
    if st.sent_load is None:
        return
    start, end = st.sent_load
    st.sent_load = None
    metrics.STATS.add_misses(miss_reasons.failed_load(start, end, failed_chunk * chunk_size, why))
