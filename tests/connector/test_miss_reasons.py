"""The miss accounting, pure: a reason for every prompt token a request did not load, and the
tokens adding up (connector/miss_reasons.py; no engine, no pool)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpool.connector import miss_reasons as mr
from kvpool.connector.miss_reasons import Answer, classify, failed_load

C = 64


def test_a_cold_request_misses_its_full_chunks_not_in_pool_and_its_tail_as_partial_block():
    b = classify(Answer(prompt_tokens=330, chunk_size=C, limit=320))
    assert b.misses == {"not_in_pool": 320, "partial_block": 10}
    assert (b.local, b.to_load, b.final) == (0, 0, 0)


def test_a_full_hit_loads_every_full_chunk():
    b = classify(Answer(prompt_tokens=330, chunk_size=C, load_end=320, pool_chunks=5, limit=320))
    assert (b.to_load, b.misses) == (320, {"partial_block": 10})


def test_the_last_block_of_a_chunk_aligned_prompt_is_computed_not_missed():
    """320 tokens, all in the pool: vLLM computes at least the last token, so the load stops at
    the block boundary before it (288 with blocks of 32): 32 tokens are 'final', not a miss."""
    b = classify(Answer(prompt_tokens=320, chunk_size=C, load_end=288, pool_chunks=5, limit=288))
    assert (b.to_load, b.final, b.misses) == (288, 32, {})


def test_a_partial_hit_misses_the_rest_not_in_pool():
    b = classify(Answer(prompt_tokens=330, chunk_size=C, load_end=192, pool_chunks=3, limit=320))
    assert (b.to_load, b.misses) == (192, {"not_in_pool": 128, "partial_block": 10})


def test_vllms_own_prefix_cache_is_neither_loaded_nor_missed():
    b = classify(Answer(prompt_tokens=330, chunk_size=C, local=128, load_end=192, pool_chunks=3, limit=320))
    assert (b.local, b.to_load, b.misses) == (128, 64, {"not_in_pool": 128, "partial_block": 10})
    # vLLM had more than the pool: nothing loaded, the pool's chunks were not needed
    b = classify(Answer(prompt_tokens=330, chunk_size=C, local=256, load_end=256, pool_chunks=3, limit=320))
    assert (b.local, b.to_load, b.misses) == (256, 0, {"not_in_pool": 64, "partial_block": 10})


def test_a_lookup_without_answer_is_pool_unreachable_with_why():
    b = classify(Answer(prompt_tokens=330, chunk_size=C, limit=320, unreachable="timeout"))
    assert b.misses == {"pool_unreachable:timeout": 320, "partial_block": 10}
    b = classify(Answer(prompt_tokens=330, chunk_size=C, limit=320, unreachable="breaker_open"))
    assert b.misses == {"pool_unreachable:breaker_open": 320, "partial_block": 10}


def test_a_refused_request_misses_every_token_vllm_computes_as_refused_with_its_feature():
    b = classify(Answer(prompt_tokens=330, chunk_size=C, pool_chunks=5, limit=320, refused="lora"))
    assert b.misses == {"refused:lora": 330}
    b = classify(Answer(prompt_tokens=330, chunk_size=C, local=64, limit=320, refused="load_off"))
    assert (b.local, b.misses) == (64, {"refused:load_off": 266})


def test_tokens_the_pool_offered_and_vllm_did_not_take_are_refused_vllm_skipped():
    b = classify(Answer(prompt_tokens=330, chunk_size=C, pool_chunks=5, limit=320, declined="vllm_skipped"))
    assert b.misses == {"refused:vllm_skipped": 320, "partial_block": 10}


def test_a_failed_load_counts_from_the_failed_chunk_under_the_workers_reason():
    assert failed_load(0, 320, 64, "corrupt") == {"load_failed:corrupt": 256}
    assert failed_load(0, 320, 64, "evicted") == {"evicted": 256}
    assert failed_load(128, 320, 64, "timeout") == {"load_failed:timeout": 192}  # starts inside the load
    assert failed_load(0, 320, 320, "corrupt") == {}
    assert failed_load(0, 320, 0, "something new") == {"load_failed:internal": 320}  # bounded


def test_labels_are_bounded():
    assert mr.label("refused", "a new feature") == "refused:other"
    assert mr.label("pool_unreachable", "ECONNRESET") == "pool_unreachable:error"
    assert mr.label("not_in_pool", "x") == "not_in_pool"
    with pytest.raises(ValueError):
        mr.label("below_break_even")  # item 3 of issue 23: not a reason yet
    assert len(mr.all_labels()) == sum(len(d) for d in mr.DETAILS.values())
    assert mr.split_label("load_failed:corrupt") == ("load_failed", "corrupt")
    assert mr.split_label("partial_block") == ("partial_block", "")


def test_describe_lists_the_largest_first():
    assert (
        mr.describe({"partial_block": 10, "not_in_pool": 320})
        == "missed 330: not_in_pool 320, partial_block 10"
    )
    assert mr.describe({}) == ""


def test_pool_error_kind():
    assert mr.pool_error_kind(TimeoutError()) == "timeout"
    assert mr.pool_error_kind(RuntimeError("Deadline Exceeded")) == "timeout"
    assert mr.pool_error_kind(ConnectionRefusedError()) == "error"


@st.composite
def requests(draw):
    """A request as the scheduler side sees it when vLLM schedules it, and its load's outcome."""
    bs = draw(st.sampled_from([16, 32, 64]))
    chunk = bs * draw(st.integers(1, 4))
    p = draw(st.integers(1, 2000) | st.integers(1, 30).map(lambda k: k * chunk))  # chunk-aligned often
    limit = (p - 1) // bs * bs  # the scheduler's: the last block boundary before the last token
    pool_chunks = draw(st.integers(0, p // chunk))  # the lookup asks about full chunks only
    local = draw(st.integers(0, p)) // bs * bs  # vLLM's prefix cache: whole blocks
    hit = min(pool_chunks * chunk, limit)
    loads = hit > local and draw(st.booleans())
    declined = hit > local and not loads
    end = hit if loads else local
    a = Answer(
        prompt_tokens=p,
        chunk_size=chunk,
        local=local,
        load_end=end,
        pool_chunks=pool_chunks,
        limit=limit,
        unreachable=draw(st.sampled_from([None, "timeout"])) if pool_chunks == 0 else None,
        refused=draw(st.sampled_from([None, None, None, "lora"])),
        declined="vllm_skipped" if declined else None,
    )
    fail_at = draw(st.integers(local, max(local, end)))
    why = draw(st.sampled_from(sorted(mr.LOAD_FAILURES)))
    return a, fail_at, why


@settings(max_examples=400, deadline=None)
@given(requests())
def test_every_prompt_token_is_loaded_local_final_or_missed_for_a_known_reason(case):
    a, fail_at, why = case
    b = classify(a)
    failed = {} if a.refused else failed_load(b.local, b.local + b.to_load, fail_at, why)
    loaded = b.to_load - sum(failed.values())
    misses = dict(b.misses)
    for k, n in failed.items():
        misses[k] = misses.get(k, 0) + n
    assert b.local + loaded + b.final + sum(misses.values()) == a.prompt_tokens
    assert all(n > 0 for n in misses.values())
    known = {mr.label(r, d) for r, d in mr.all_labels()}
    assert set(misses) <= known
    full = a.prompt_tokens // a.chunk_size * a.chunk_size
    absent = sum(n for k, n in b.misses.items() if k == "not_in_pool" or k.startswith("pool_unreachable"))
    assert absent == (0 if a.refused else max(0, full - max(a.load_end, a.pool_chunks * a.chunk_size)))
    assert misses.get("partial_block", 0) == (0 if a.refused else a.prompt_tokens - max(b.local, full))
