"""Model identity by content (connector/model_identity.py): real files, a real hub cache layout,
the real on-disk digest cache."""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path

import pytest

from kvpool.connector import model_identity as mi

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PAST_NS = int((time.time() - 3600) * 1e9)  # older than the racy window: digests may be cached


def _model(d: Path, weights: bytes = b"w" * 4096, mtime_ns: int = PAST_NS) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text('{"hidden_size": 8}')
    (d / "tokenizer.json").write_text("{}")
    (d / "model-00001-of-00002.safetensors").write_bytes(weights)
    (d / "model-00002-of-00002.safetensors").write_bytes(b"second shard")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    for f in d.iterdir():
        os.utime(f, ns=(mtime_ns, mtime_ns))
    return d


def test_select_weight_files_picks_top_level_weights_and_index_else_everything():
    names = ["config.json", "a.safetensors", "a.safetensors.index.json", "x.gguf", "original/c.pth", "t.bin"]
    assert mi.select_weight_files(names) == ["a.safetensors", "a.safetensors.index.json", "t.bin", "x.gguf"]
    assert mi.select_weight_files(["config.json", "sub/w.dat"]) == ["config.json", "sub/w.dat"]


def test_digest_changes_when_a_weight_files_bytes_change(tmp_path):
    d = _model(tmp_path / "m")
    before = mi.hash_weights(str(d), memo={})
    _model(d, weights=b"v" * 4096, mtime_ns=PAST_NS + 10**9)  # same size, other bytes
    after = mi.hash_weights(str(d), memo={})
    assert before.digest != after.digest
    assert before.digest.startswith("blake3:") and before.files == 3  # two shards and the index


def test_files_that_are_not_weights_do_not_change_the_digest(tmp_path):
    d = _model(tmp_path / "m")
    before = mi.hash_weights(str(d), memo={})
    (d / "tokenizer.json").write_text('{"changed": true}')
    assert mi.hash_weights(str(d), memo={}).digest == before.digest


def test_the_same_files_at_another_path_have_the_same_digest(tmp_path):
    d = _model(tmp_path / "m")
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(d, copy)
    assert mi.hash_weights(str(copy), memo={}).digest == mi.hash_weights(str(d), memo={}).digest


def test_a_directory_without_weight_files_is_hashed_whole(tmp_path):
    d = tmp_path / "odd"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "params.dat").write_bytes(b"1" * 100)
    (d / ".git").mkdir()
    (d / ".git" / "HEAD").write_text("ref")
    first = mi.hash_weights(str(d), memo={})
    assert first.files == 1
    (d / "sub" / "params.dat").write_bytes(b"2" * 100)
    assert mi.hash_weights(str(d), memo={}).digest != first.digest


def test_hub_snapshot_path_gives_its_commit_without_hashing(tmp_path):
    snap = _model(tmp_path / "hub" / "models--org--name" / "snapshots" / COMMIT)
    ident = mi.weights_identity(str(snap), cache_file=None, memo={})
    assert (ident.digest, ident.source, ident.bytes_hashed) == (f"hub:{COMMIT}", "hub commit", 0)
    assert mi.hub_commit_from_path(f"/x/models--a--b/snapshots/{COMMIT}") == COMMIT
    assert mi.hub_commit_from_path("/models/llm") is None
    assert mi.hub_commit_from_path(f"/x/snapshots/{COMMIT}") is None  # not inside a hub cache


def test_a_hub_name_resolves_through_the_local_hub_cache_only(tmp_path):
    cache = tmp_path / "hf"
    repo = cache / "models--org--name"
    _model(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    ident = mi.weights_identity("org/name", download_dir=str(cache), cache_file=None, memo={})
    assert ident.digest == f"hub:{COMMIT}"
    with pytest.raises(mi.UnknownWeights):  # not in the cache: never downloaded, never guessed
        mi.weights_identity("org/other", download_dir=str(cache), cache_file=None, memo={})


def test_the_on_disk_cache_avoids_a_rehash_and_is_invalidated_by_mtime_and_size(tmp_path):
    d = _model(tmp_path / "m")
    cache = tmp_path / "cache" / "weight-digests.json"
    first = mi.hash_weights(str(d), cache_file=cache, memo={})
    assert first.source == "hashed" and first.bytes_hashed == 4096 + 12 + 18
    assert len(json.loads(cache.read_text())["files"]) == 3
    again = mi.hash_weights(str(d), cache_file=cache, memo={})  # a new process: only the file
    assert (again.source, again.bytes_hashed, again.digest) == ("from cache", 0, first.digest)

    shard = d / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"v" * 4096)  # same size, new mtime
    os.utime(shard, ns=(PAST_NS + 10**9, PAST_NS + 10**9))
    changed = mi.hash_weights(str(d), cache_file=cache, memo={})
    assert changed.bytes_hashed == 4096 and changed.digest != first.digest  # only that file

    shard.write_bytes(b"v" * 4097)  # other size, the same mtime as the cached entry
    os.utime(shard, ns=(PAST_NS + 10**9, PAST_NS + 10**9))
    grown = mi.hash_weights(str(d), cache_file=cache, memo={})
    assert grown.bytes_hashed == 4097 and grown.digest != changed.digest


def test_the_in_process_cache_avoids_a_rehash(tmp_path):
    d = _model(tmp_path / "m")
    memo: dict = {}
    assert mi.hash_weights(str(d), cache_file=None, memo=memo).bytes_hashed > 0
    assert mi.hash_weights(str(d), cache_file=None, memo=memo).bytes_hashed == 0


def test_a_file_modified_just_now_is_not_cached(tmp_path):
    d = _model(tmp_path / "m", mtime_ns=time.time_ns())
    cache = tmp_path / "c.json"
    memo: dict = {}
    mi.hash_weights(str(d), cache_file=cache, memo=memo)
    again = mi.hash_weights(str(d), cache_file=cache, memo=memo)
    assert again.source == "hashed" and again.bytes_hashed > 0


def test_an_unreadable_or_unwritable_cache_is_ignored(tmp_path):
    d = _model(tmp_path / "m")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert mi.hash_weights(str(d), cache_file=bad, memo={}).source == "hashed"
    assert json.loads(bad.read_text())["version"] == mi.CACHE_VERSION  # rewritten whole
    blocker = tmp_path / "file"
    blocker.write_text("")
    ident = mi.hash_weights(str(d), cache_file=blocker / "sub" / "c.json", memo={})  # cannot mkdir
    assert ident.source == "hashed"


def test_default_cache_file_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("KVPOOL_WEIGHT_DIGEST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mi.default_cache_file() == tmp_path / "kvpool" / "weight-digests.json"
    monkeypatch.setenv("KVPOOL_WEIGHT_DIGEST_CACHE", "")
    assert mi.default_cache_file() is None


def test_unknown_weights_are_refused(tmp_path):
    with pytest.raises(mi.UnknownWeights):
        mi.weights_identity(str(tmp_path / "missing"), cache_file=None, memo={})
    (tmp_path / "empty").mkdir()
    with pytest.raises(mi.UnknownWeights):
        mi.weights_identity(str(tmp_path / "empty"), cache_file=None, memo={})


def test_a_single_weights_file_is_identified_by_its_bytes(tmp_path):
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for f in (a, b):
        f.parent.mkdir()
        f.write_bytes(b"gguf" * 100)
    assert mi.weights_identity(str(a), memo={}).digest == mi.weights_identity(str(b), memo={}).digest


def test_device_software_and_attention_variant():
    import torch

    cap = mi.device_capability(torch.device("cpu"))
    assert cap == f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"
    versions = mi.software_versions()
    assert versions["vllm_version"] and versions["torch_version"] == torch.__version__

    class FlashImpl:
        vllm_flash_attn_version = 3

    assert mi.attention_variant(FlashImpl()) == "fa3"
    assert mi.attention_variant(object()) == mi.attention_variant(None) == ""
