"""The settings registry is the one definition: flags, env vars, defaults and docs all come from it."""

from __future__ import annotations

import dataclasses
import inspect
import pathlib

import pytest

from kvpool.cachenode.core import settings as registry
from kvpool.cachenode.core.settings.shared_tiers import SharedTiersConfig
from kvpool.cli.devtools.settings_doc import replace_reference
from kvpool.cli.main import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_docs_reference_is_current() -> None:
    doc = ROOT / "docs" / "settings.md"
    assert replace_reference(doc.read_text()) == doc.read_text(), (
        "run python -m kvpool.cli.devtools.settings_doc docs/settings.md"
    )
    for s in registry.SETTINGS_LIST:
        assert f"`{s.env}`" in doc.read_text()


@pytest.mark.parametrize("command", ["node", "up", "agent", "lookup"])
def test_node_up_agent_and_lookup_flags_are_generated_from_the_registry(command: str) -> None:
    expected = registry.for_command(command)
    names = {s.name for s in expected}
    # Every setting of the command, in registry order; anything else is the command's own (--log-level).
    params = {p.name: p for p in cli.commands[command].params if p.name in names}
    assert list(params) == [s.name for s in expected]
    for s in expected:
        p = params[s.name]
        assert p.opts[0] == s.flag and p.envvar == s.env, s.name
        assert p.default == s.default_for(command), s.name
        assert s.env == "KVPOOL_" + s.flag[2:].replace("-", "_").upper()


def test_every_env_var_names_one_setting() -> None:
    envs = [s.env for s in registry.SETTINGS_LIST]
    assert len(envs) == len(set(envs))
    assert all(registry.by_env(e).env == e for e in envs)
    assert registry.by_env("KVPOOL_NODES") is None and registry.by_env("PATH") is None


def test_shared_tier_defaults_equal_the_registry() -> None:
    """`SharedTiersConfig.from_options` keeps keyword defaults for callers in code; they must match."""
    for name, param in inspect.signature(SharedTiersConfig.from_options).parameters.items():
        if param.kind is param.KEYWORD_ONLY:
            s = registry.SETTINGS[name]
            assert registry.SETTINGS[name].value(param.default) == s.default_value, name


def test_node_settings_defaults_come_from_the_registry() -> None:
    ns = registry.NodeSettings()
    for name in ("port", "memory", "max_value_size", "peers", "replication_factor", "handoff_deadline"):
        assert getattr(ns, name) == registry.default(name)
    assert (ns.memory, ns.replication_factor, ns.handoff_deadline, ns.peers) == (4 << 30, 1, 30.0, "")


def test_check_node_env_refuses_what_the_node_refuses() -> None:
    ok = {"KVPOOL_MEMORY": "1073741824", "KVPOOL_S3_URL": "s3://bucket/p", "KVPOOL_URL": "grpc://x:7400"}
    registry.check_node_env(ok)
    for env, message in [
        ({"KVPOOL_S3_URL": "s3://my..bucket"}, "KVPOOL_S3_URL='s3://my..bucket'.*not a valid S3 bucket"),
        ({"KVPOOL_REDIS_URL": "http://cache:6379"}, "KVPOOL_REDIS_URL"),
        ({"KVPOOL_MEMORY": "lots"}, "not a size"),
        ({"KVPOOL_S3_ENDPOINT": "http://minio:9000"}, "needs --s3-url"),
        ({"KVPOOL_DISK_SIZE": "1GiB"}, "needs --disk-dir"),
        ({"KVPOOL_LOW_WATERMARK": "0.99"}, "watermarks"),
        ({"KVPOOL_NODES": "a,b"}, "no kvpool setting reads KVPOOL_NODES"),
    ]:
        with pytest.raises(ValueError, match=message):
            registry.check_node_env(env)


def test_values_round_trip_through_env_text() -> None:
    for s in registry.SETTINGS_LIST:
        if s.default is not None:
            assert s.parse(s.text(s.default_value)) == s.default_value, s.name


def test_connector_settings_are_read_through_the_registry() -> None:
    """Each field is a setting read by clients: its default, its env var, its parser."""
    fields = dataclasses.fields(registry.ConnectorSettings)
    defaults = registry.ConnectorSettings()
    for f in fields:
        s = registry.SETTINGS[f.name]
        assert registry.CLIENT in s.readers, f.name
        assert getattr(defaults, f.name) == registry.default(f.name, registry.CLIENT), f.name
    assert (defaults.memory, defaults.save_buffer, defaults.lease_ms) == (2 << 30, 1 << 30, 10_000)
    env = {"KVPOOL_LEASE_MS": "250", "KVPOOL_LOAD": "off", "KVPOOL_MEMORY": "1GiB", "KVPOOL_DISK_DIR": "/d/"}
    loaded = registry.load_settings({"lease_ms": 100}, env=env)
    assert (loaded.lease_ms, loaded.load, loaded.memory) == (100, False, 1 << 30)
    assert (loaded.disk_dir, loaded.disk_size) == ("/d/", 8 << 30)
    with pytest.raises(ValueError, match="chunk_size"):
        registry.load_settings({"chunk_size": "many"}, env={})


def test_lookup_settings_defaults_come_from_the_registry() -> None:
    ls = registry.LookupSettings()
    assert (ls.port, ls.http_port, ls.holder_lease, ls.max_holders) == (7410, 7411, 15.0, 1024)
    for name in ("host", "port", "http_port", "max_query_keys", "max_snapshot_keys", "advertise_host"):
        assert getattr(ls, name) == registry.default(name, registry.LOOKUP), name
    assert registry.lookup_settings({"holder_lease": 2.0}).effective_rebuild_window == 2.0
    with pytest.raises(ValueError, match="--max-holders"):
        registry.lookup_settings({"max_holders": 0})
