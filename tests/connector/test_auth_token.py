"""A pool with auth on: the connector sends its token (KVPOOL_AUTH_TOKEN or KVPOOL_AUTH_TOKEN_FILE),
as the operator hands it to engine pods by Secret reference."""

from __future__ import annotations

import pytest

from kvpool.cachenode import Unauthenticated
from kvpool.cachenode.core.settings import load_settings
from kvpool.cli.devtools.local_servers import kvpool_up
from kvpool.connector.backend import bearer_token, open_pool

KEY, VALUE = b"k" * 32, b"chunk bytes"


def test_connector_sends_the_token_from_the_env(tmp_path, monkeypatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    with kvpool_up("--memory", "64MiB", "--auth-token-file", str(token_file)) as (_, url):
        anonymous = open_pool(url, memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=5, token="")
        with pytest.raises(Unauthenticated):
            anonymous.pool.get_many([KEY])
        assert anonymous.get_many([KEY]) == [None]  # through the safe wrapper: a miss, never an error

        monkeypatch.setenv("KVPOOL_AUTH_TOKEN_FILE", str(token_file))
        pool = open_pool(url, memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=5)
        pool.pool.put_many([(KEY, VALUE)])
        assert [bytes(v) for v in pool.pool.get_many([KEY])] == [VALUE]


def test_token_sources_and_precedence(tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert bearer_token(load_settings({}, env={})) is None
    assert bearer_token(load_settings({}, env={"KVPOOL_AUTH_TOKEN_FILE": str(token_file)})) == "from-file"
    both = {"KVPOOL_AUTH_TOKEN": "from-env", "KVPOOL_AUTH_TOKEN_FILE": str(token_file)}
    assert bearer_token(load_settings({}, env=both)) == "from-env"
    assert bearer_token(load_settings({"auth_token": "from-config"}, env=both)) == "from-config"
    assert "from-env" not in repr(load_settings({}, env=both))
    with pytest.raises(ValueError, match="cannot read"):
        bearer_token(load_settings({}, env={"KVPOOL_AUTH_TOKEN_FILE": str(tmp_path / "missing")}))
