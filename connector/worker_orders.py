"""The scheduler's orders to its workers for one step, built from each request's state: what to
load into which blocks (with the lease that pins it) and which confirmed chunks to store. Pure:
the caller hands in each request's block ids."""

from __future__ import annotations

from collections.abc import Callable

from .metadata import KVPoolMetadata, LoadTask, SaveTask
from .request_state import RequestState


def load_task(
    req_id: str,
    st: RequestState,
    block_ids: list[int],
    *,
    chunk: int,
    block: int,
    ranks: int,
    background: bool,
) -> LoadTask:
    """The workers' orders for ``st.load``; its lease goes with them (each releases its keys)."""
    start, end = st.load
    first = start // chunk
    last = -(-end // chunk)  # the last chunk may be loaded in part
    lease_id, lease_keys = 0, {}
    if st.lease is not None:
        lease_id, st.lease = st.lease[0], None
        # rank r's chunk i sat at i*ranks + r of the pinned lookup
        lease_keys = {r: k[: max(0, st.pinned - r + ranks - 1) // ranks] for r, k in st.keys.items()}
    st.load, st.sent_load = None, (start, end)
    return LoadTask(
        req_id=req_id,
        keys={r: k[first:last] for r, k in st.keys.items()},
        first_chunk=first,
        block_ids=list(block_ids[start // block : end // block]),
        start_token=start,
        end_token=end,
        prompt_tokens=st.prompt_tokens,
        lease_id=lease_id,
        lease_keys=lease_keys,
        background=background,
        misses=dict(st.missed),
    )


def confirmed_saves(
    reqs: dict[str, RequestState],
    block_ids: Callable[[str], list[int]],
    meta: KVPoolMetadata,
    *,
    chunk: int,
    block: int,
) -> None:
    """Chunks whose computing step came back clean are stored now (their blocks are still the
    request's: running, or finished with the free delayed for us). Finished requests with
    nothing left to wait for are released (dropped from ``reqs``)."""
    for req_id, st in list(reqs.items()):
        first, done = st.saved_upto, st.confirmed_upto
        if done > first:
            blocks = block_ids(req_id)
            meta.saves.append(
                SaveTask(
                    req_id=req_id,
                    keys={r: k[first:done] for r, k in st.keys.items()},
                    first_chunk=first,
                    block_ids=list(blocks[first * chunk // block : done * chunk // block]),
                )
            )
            st.saved_upto = done
            st.saving = True
        if st.finished and not st.pending:
            meta.released.append(req_id)
            del reqs[req_id]
