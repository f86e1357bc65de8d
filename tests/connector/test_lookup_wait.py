"""The scheduler's wait for a lookup (connector/lookup_wait.py): pure logic, made-up timings."""

from __future__ import annotations

import pytest

from kvpool.connector.lookup_wait import FLOOR_S, WARM_UP, Ask, LookupWait


def answer(wait: LookupWait, seconds: float, hash_s: float = 0.0, tokens: int = 0) -> Ask:
    ask = Ask(submitted=100.0)
    wait.answered(ask, 100.0 + hash_s + seconds, hash_s, tokens)
    return ask


def test_until_a_few_lookups_answered_the_cap_is_waited_for():
    wait = LookupWait(0.005)
    for _ in range(WARM_UP - 1):
        assert wait.budget() == 0.005
        answer(wait, 0.0001)
    answer(wait, 0.0001)
    assert wait.budget() == FLOOR_S  # fast answers: the floor


def test_the_budget_follows_the_recent_p90_with_a_margin_under_the_cap():
    wait = LookupWait(0.005)
    for _ in range(20):
        answer(wait, 0.0015)
    assert wait.budget() == pytest.approx(0.003)  # 2 x 1.5 ms
    for _ in range(20):
        answer(wait, 0.004)
    assert wait.budget() == 0.005  # 2 x 4 ms, capped


def test_a_pool_typically_slower_than_the_cap_is_not_waited_for():
    wait = LookupWait(0.005)
    for _ in range(10):
        answer(wait, 0.02)
    assert wait.budget() == 0.0
    for _ in range(64):  # it recovers: answers keep being timed without anyone waiting
        answer(wait, 0.0002)
    assert wait.budget() == FLOOR_S


def test_hashing_a_new_request_is_budgeted_by_its_length():
    wait = LookupWait(0.005)
    for _ in range(10):
        answer(wait, 0.0002, hash_s=0.0001, tokens=1000)  # 0.1 us per token
    assert wait.budget() == FLOOR_S  # keys already hashed: the lookup alone
    assert wait.budget(10_000) == pytest.approx(FLOOR_S + 2 * 0.001)
    assert wait.budget(1_000_000) == 0.005


def test_while_a_given_up_lookup_is_unanswered_nothing_is_waited_for():
    wait = LookupWait(0.005)
    for _ in range(10):
        answer(wait, 0.0002)
    late = Ask(submitted=200.0)
    wait.gave_up(late)
    wait.gave_up(late)  # counted once
    assert wait.budget() == 0.0
    wait.answered(late, 200.5)
    assert wait.budget() == FLOOR_S  # it answered: one slow lookup in eleven is above the p90
    wait.answered(late, 201.0)  # reported twice: ignored
    assert wait._overdue == 0


def test_a_cap_of_zero_never_waits():
    wait = LookupWait(0.0)
    assert wait.budget() == 0.0
    answer(wait, 0.0001)
    assert wait.budget(100) == 0.0
