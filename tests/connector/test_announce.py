"""The producer's announcement in kv_transfer_params (connector/announce.py): what a consumer
accepts, ignores, and how long it waits for the chunks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvpool.connector import announce
from kvpool.connector.announce import Announcement

KEYS = [bytes([i]) * 32 for i in range(1, 9)]


def test_an_announcement_survives_json_as_routers_carry_it():
    ann = announce.announce(KEYS, 5)
    assert ann == Announcement(5, KEYS[4])
    carried = json.loads(json.dumps({"do_remote_decode": False, **ann.params()}))
    assert announce.read(carried) == ann
    assert announce.applies(ann, KEYS)


def test_nothing_to_announce_without_a_full_chunk():
    assert announce.announce(KEYS, 0) is None
    assert announce.announce([], 3) is None
    assert announce.announce(KEYS, 99) == Announcement(len(KEYS), KEYS[-1])  # never past its keys


@pytest.mark.parametrize(
    "params",
    [
        None, "kvpool", {}, {"kvpool": None}, {"kvpool": []}, {"kvpool": {"chunks": 2}},
        {"kvpool": {"key": "00"}}, {"kvpool": {"chunks": "2", "key": "00"}},
        {"kvpool": {"chunks": True, "key": "00"}}, {"kvpool": {"chunks": 0, "key": "00"}},
        {"kvpool": {"chunks": -1, "key": "00"}}, {"kvpool": {"chunks": 1 << 40, "key": "00"}},
        {"kvpool": {"chunks": 2, "key": "zz"}}, {"kvpool": {"chunks": 2, "key": ""}},
        {"kvpool": {"chunks": 2, "key": "ab" * 100}}, {"kvpool": {"chunks": 2.0, "key": "00"}},
    ],
)  # fmt: skip
def test_a_malformed_announcement_is_ignored(params):
    assert announce.read(params) is None


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_any_json_a_client_sends_is_read_or_ignored_never_raises(value):
    ann = announce.read({"kvpool": value})
    assert ann is None or (ann.chunks > 0 and ann.key)


def test_an_announcement_of_another_engine_or_prompt_does_not_apply():
    ann = announce.announce(KEYS, 5)
    other = [bytes([i + 100]) * 32 for i in range(8)]  # another fingerprint or chunk size: other keys
    assert not announce.applies(ann, other)
    assert not announce.applies(ann, KEYS[:4])  # a shorter prompt
    assert announce.applies(ann, KEYS[:5])


@pytest.mark.parametrize(
    ("found", "limit", "waited", "wait"),
    [
        (0, 8, 0.0, True),  # nothing stored yet: ask again
        (4, 8, 0.5, True),
        (5, 8, 0.5, False),  # every announced chunk is there
        (7, 8, 0.5, False),  # more than announced (stored by someone else): take it
        (2, 2, 0.5, False),  # the request may load no more (its load failed there)
        (0, 8, 1.0, False),  # the bound passed: compute the rest
    ],
)
def test_a_consumer_waits_for_expected_chunks_within_the_bound(found, limit, waited, wait):
    assert announce.keep_waiting(5, found, limit, waited, bound_s=1.0) is wait


def test_nothing_expected_no_wait():
    assert announce.keep_waiting(0, 0, 8, 0.0, bound_s=1.0) is False


@pytest.mark.parametrize(
    ("ann", "tokens", "consumer", "expect"),
    [
        (Announcement(5, KEYS[4]), 300, False, 5),  # announced, any role that loads
        (Announcement(5, KEYS[4]), 300, True, 5),
        (Announcement(5, bytes(32)), 300, True, 0),  # of other keys: never waited for
        (None, 8 * 32, True, 7),  # unannounced consumer: all but the last token's chunk
        (None, 8 * 32 + 1, True, 8),  # the prompt plus the prefill's first token
        (None, 8 * 32 + 20, True, 8),
        (None, 10, True, 0),
        (None, 300, False, 0),  # kv_both without an announcement: a plain lookup
    ],
)
def test_what_a_request_expects(ann, tokens, consumer, expect):
    assert announce.expected(ann, KEYS, tokens, 32, consumer) == expect


def test_unannounced_waits_stop_after_empty_waits_in_a_row_and_resume_on_a_find():
    waits = announce.UnannouncedWaits(limit=3)
    assert waits.on
    assert not waits.waited(found=0) and not waits.waited(found=2)  # a find resets the count
    assert not waits.waited(found=0) and not waits.waited(found=0)
    assert waits.on
    assert waits.waited(found=0)  # the third empty wait in a row turns waiting off, once
    assert not waits.on and not waits.waited(found=0)
    waits.found()
    assert waits.on
