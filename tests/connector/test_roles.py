"""vLLM's kv_role sets which way KV flows (issue 24, item 1): a producer (prefill engine) stores and
never loads, a consumer (decode engine) loads and never stores, kv_both leaves it to the settings;
a setting that contradicts the role is refused at start-up, naming both."""

from __future__ import annotations

import pytest

from kvpool.cachenode.core.settings import load_settings


@pytest.mark.parametrize(
    ("role", "load", "save"),
    [("kv_producer", False, True), ("kv_consumer", True, False), ("kv_both", True, True), (None, True, True)],
)
def test_each_role_sets_load_and_save(role, load, save):
    s = load_settings({}, env={}, kv_role=role)
    assert (s.load, s.save) == (load, save)


def test_kv_both_leaves_load_and_save_to_the_settings():
    s = load_settings({"load": "false"}, env={"KVPOOL_SAVE": "0"}, kv_role="kv_both")
    assert (s.load, s.save) == (False, False)


@pytest.mark.parametrize(
    ("role", "extra", "env", "named"),
    [
        ("kv_producer", {"load": True}, {}, "load: true contradicts kv_role 'kv_producer'"),
        ("kv_producer", {}, {"KVPOOL_SAVE": "false"}, "save: false contradicts kv_role 'kv_producer'"),
        ("kv_consumer", {"save": "true"}, {}, "save: true contradicts kv_role 'kv_consumer'"),
        ("kv_consumer", {}, {"KVPOOL_LOAD": "no"}, "load: false contradicts kv_role 'kv_consumer'"),
    ],
)
def test_a_setting_that_contradicts_the_role_is_refused(role, extra, env, named):
    with pytest.raises(ValueError, match=named) as caught:
        load_settings(extra, env=env, kv_role=role)
    assert "kv_both" in str(caught.value)  # says what to do about it


@pytest.mark.parametrize(
    ("role", "extra"), [("kv_producer", {"load": "false"}), ("kv_consumer", {"save": False})]
)
def test_a_setting_that_agrees_with_the_role_is_accepted(role, extra):
    s = load_settings(extra, env={}, kv_role=role)
    assert s.load != s.save


def test_an_unknown_role_is_refused():
    with pytest.raises(
        ValueError, match="kv_role: 'kv_prefill' is not one of kv_both, kv_producer, kv_consumer"
    ):
        load_settings({}, env={}, kv_role="kv_prefill")
