"""Model identity by content: which weights, software and device computed a chunk's KV.

A model's name or path says nothing about its weights: a fine-tune written over ``/models/llm``
keeps the path, and the same weights may sit at two paths. So the chunk keys carry a digest of the
weights themselves — the hub snapshot's commit when vLLM loaded from a Hugging Face hub cache (a
commit names every file of the repository), otherwise a blake3 over the weight files. Hashing a
large model takes seconds to minutes, so it runs once per worker at start-up (never on the request
path), with blake3's multithreaded memory-mapped hashing, and each file's digest is cached by
(real path, size, mtime_ns, inode) in the process and in a small JSON file that survives restarts.

Besides the weights, the KV bytes depend on the software and the device that computed them
(kernels differ between vLLM, torch and CUDA versions, between compute capabilities and between
FlashAttention 2 and 3), so those are in the fingerprint too (``software_versions``,
``device_capability``, ``attention_variant``).

Pure helpers (``hub_commit_from_path``, ``select_weight_files``, ``combine_digests``,
``cache_hit``) are separate from the functions that read files, stat them or import torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import struct
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import blake3

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
INDEX_SUFFIXES = tuple(s + ".index.json" for s in WEIGHT_SUFFIXES)
CACHE_VERSION = 1
# A file modified within this many seconds of being hashed may change again within the same mtime
# tick (coarse file-system clocks): its digest is used but not cached ("racy", as git calls it).
RACY_S = 2.0

_HUB_SNAPSHOT = re.compile(r"(?:^|/)models--[^/]+/snapshots/([0-9a-f]{40})(?:/|$)")

Signature = tuple[int, int, int]  # (size, mtime_ns, inode)


class UnknownWeights(Exception):
    """The weights cannot be identified by content: the cache must stay off."""


@dataclass(frozen=True)
class WeightsIdentity:
    """The weights' digest and how it was obtained (for the start-up log line and tests)."""

    digest: str  # "hub:<commit>" or "blake3:<hex>"
    source: str  # "hub commit", "hashed" or "from cache"
    files: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0


# -- pure helpers -----------------------------------------------------------------------------------


def hub_commit_from_path(path: str) -> str | None:
    """The commit of a Hugging Face hub cache snapshot (``.../models--org--name/snapshots/<commit>``),
    or None for any other path."""
    m = _HUB_SNAPSHOT.search(path.replace(os.sep, "/"))
    return m.group(1) if m else None


def select_weight_files(names: Sequence[str]) -> list[str]:
    """Which of a model directory's files (relative names, "/"-separated) make up the weights: the
    top-level weight files and their index json (what vLLM loads), sorted; every file when there
    are none (a format we do not know: hash all of it)."""
    chosen = [n for n in names if "/" not in n and n.endswith(WEIGHT_SUFFIXES + INDEX_SUFFIXES)]
    return sorted(chosen or names)


def _field(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def combine_digests(entries: Sequence[tuple[str, int, str]]) -> str:
    """One digest for a set of files, from (name relative to the model, size, blake3 hex) each:
    independent of where the model sits, different if any file's bytes or names differ."""
    h = blake3.blake3(b"kvpool-weights")
    for name, size, digest in sorted(entries):
        h.update(_field(name.encode()) + struct.pack("<Q", size) + _field(digest.encode()))
    return "blake3:" + h.hexdigest()


def cache_hit(cache: dict, path: str, sig: Signature) -> str | None:
    """The cached digest of ``path`` if its signature still matches, else None."""
    entry = cache.get(path)
    if isinstance(entry, dict) and [entry.get(k) for k in ("size", "mtime_ns", "inode")] == list(sig):
        digest = entry.get("blake3")
        return digest if isinstance(digest, str) else None
    return None


# -- files, caches, hashing ---------------------------------------------------------------------------

# In-process cache: real path → {"size", "mtime_ns", "inode", "blake3"} (the on-disk format).
_PROCESS_CACHE: dict[str, dict] = {}


def default_cache_file() -> Path | None:
    """``$KVPOOL_WEIGHT_DIGEST_CACHE`` ("" turns the file off), else
    ``$XDG_CACHE_HOME/kvpool/weight-digests.json`` (``~/.cache`` by default)."""
    env = os.environ.get("KVPOOL_WEIGHT_DIGEST_CACHE")
    if env is not None:
        return Path(env) if env else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvpool" / "weight-digests.json"


def weight_files(model_path: str) -> list[tuple[str, str, os.stat_result]]:
    """(name relative to the model, real path, stat) of the files that make up the weights: the
    file itself, or a directory's files as ``select_weight_files`` picks them (hidden files and
    folders aside; symlinks followed, as in a hub snapshot)."""
    p = Path(model_path)
    if p.is_file():
        return [(p.name, os.path.realpath(p), p.stat())]
    if not p.is_dir():
        raise UnknownWeights(f"{model_path} is neither a file nor a directory")
    names: list[str] = []
    for root, dirs, files in os.walk(p):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            full = os.path.join(root, f)
            if not f.startswith(".") and os.path.isfile(full):
                names.append(Path(os.path.relpath(full, p)).as_posix())
    names = select_weight_files(names)
    if not names:
        raise UnknownWeights(f"{model_path} holds no files")
    return [(n, os.path.realpath(p / n), (p / n).stat()) for n in names]


def hash_file(path: str, size: int) -> str:
    """blake3 of one file: memory-mapped, on every core (large weight files hash at disk speed)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    if size:
        h.update_mmap(path)
    return h.hexdigest()


def _load_cache(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
            return data["files"]
    except Exception as exc:
        log.debug("kvpool: weight digest cache %s not read (%s)", path, exc)
    return {}


def _save_cache(path: Path | None, files: dict) -> None:
    """Write the cache atomically (temporary file, rename); any failure only costs a rehash later."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".weight-digests.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "files": files}, f, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except Exception as exc:
        log.debug("kvpool: weight digest cache %s not written (%s)", path, exc)


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock next to the cache file while hashing: the workers of one host (TP
    ranks) then hash a model once, and the others find it in the cache. Best effort."""
    if path is None:
        yield
        return
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(str(path) + ".lock", "a")  # noqa: SIM115 (held for the whole block)
    except Exception as exc:
        log.debug("kvpool: weight digest cache lock not taken (%s)", exc)
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        f.close()  # releases the lock


def hash_weights(
    model_path: str, cache_file: Path | None = None, memo: dict[str, dict] | None = None
) -> WeightsIdentity:
    """The digest of the weight files under ``model_path``, hashing only files whose (size,
    mtime_ns, inode) is in neither ``memo`` (in-process) nor ``cache_file`` (on disk)."""
    memo = _PROCESS_CACHE if memo is None else memo
    t0 = time.perf_counter()
    files = weight_files(model_path)
    entries: list[tuple[str, int, str]] = []
    todo: list[tuple[str, str, os.stat_result]] = []
    for rel, real, st in files:
        digest = cache_hit(memo, real, (st.st_size, st.st_mtime_ns, st.st_ino))
        if digest is None:
            todo.append((rel, real, st))
        else:
            entries.append((rel, st.st_size, digest))
    hashed = 0
    if todo:
        with _locked(cache_file):
            disk = _load_cache(cache_file)
            dirty = False
            for rel, real, st in todo:
                sig = (st.st_size, st.st_mtime_ns, st.st_ino)
                digest = cache_hit(disk, real, sig)
                if digest is None:
                    digest = hash_file(real, st.st_size)
                    hashed += st.st_size
                    if os.stat(real).st_mtime_ns != st.st_mtime_ns:
                        raise UnknownWeights(f"{real} changed while it was hashed")
                    if time.time() - st.st_mtime_ns / 1e9 < RACY_S:
                        entries.append((rel, st.st_size, digest))
                        continue  # modified just now: may change again within the same mtime tick
                    disk[real] = {"size": sig[0], "mtime_ns": sig[1], "inode": sig[2], "blake3": digest}
                    dirty = True
                memo[real] = {"size": sig[0], "mtime_ns": sig[1], "inode": sig[2], "blake3": digest}
                entries.append((rel, st.st_size, digest))
            if dirty:  # entries of files that are gone are dropped: the file never grows without bound
                _save_cache(cache_file, {p: e for p, e in disk.items() if os.path.exists(p)})
    return WeightsIdentity(
        digest=combine_digests(entries),
        source="hashed" if hashed else "from cache",
        files=len(files),
        bytes_hashed=hashed,
        seconds=time.perf_counter() - t0,
    )


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> str | None:
    """The local snapshot folder of a hub model, from the local cache only (never downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except Exception as exc:
        log.debug("kvpool: %s not found in the local hub cache (%s)", repo_id, exc)
        return None


def weights_identity(
    model: str,
    revision: str | None = None,
    download_dir: str | None = None,
    cache_file: Path | None = None,
    memo: dict[str, dict] | None = None,
) -> WeightsIdentity:
    """Identify the weights vLLM loaded from ``model`` (a local path or a hub name): the hub commit
    of a hub cache snapshot, else a digest of the files. Raises UnknownWeights when neither works."""
    path = model if os.path.exists(model) else _hub_snapshot(model, revision, download_dir)
    if path is None:
        raise UnknownWeights(f"{model!r} is neither a local path nor in the local hub cache")
    for candidate in (path, os.path.realpath(path)):
        commit = hub_commit_from_path(candidate)
        if commit is not None:
            return WeightsIdentity(digest=f"hub:{commit}", source="hub commit")
    return hash_weights(path, cache_file, memo)


def log_identity(model: str, ident: WeightsIdentity) -> None:
    """One info line per worker start: which weights, and what identifying them cost."""
    if ident.source == "hashed":
        how = f"{ident.bytes_hashed} bytes of {ident.files} files hashed in {ident.seconds:.3f} s"
    else:
        how = ident.source
    log.info("kvpool: weights of %s: %s (%s)", model, ident.digest, how)


# -- software and device --------------------------------------------------------------------------


def software_versions() -> dict[str, str]:
    """vLLM's, torch's and CUDA's versions: kernels (and so KV bits) change between releases."""
    import torch
    import vllm

    return {
        "vllm_version": str(getattr(vllm, "__version__", "")),
        "torch_version": str(torch.__version__),
        "cuda_version": str(torch.version.cuda or ""),
    }


def device_capability(device) -> str:
    """The compute capability of ``device`` (a torch.device): the kernels a GPU generation runs
    differ (H100 vs A100), and a CPU's vector ISA decides which kernels the CPU backend runs."""
    import platform

    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        cap = f"cuda:{major}.{minor}"
        if getattr(torch.version, "hip", None):
            cap += ":" + str(getattr(torch.cuda.get_device_properties(device), "gcnArchName", ""))
        return cap
    if device.type == "cpu":
        return f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"
    return f"{device.type}:unknown"


def attention_variant(impl: object) -> str:
    """The variant of an attention backend's implementation that changes its kernels: the
    FlashAttention version vLLM chose (``get_flash_attn_version``, stored on the impl as
    ``vllm_flash_attn_version``); "" for backends without variants."""
    fa = getattr(impl, "vllm_flash_attn_version", None)
    return f"fa{fa}" if fa is not None else ""
