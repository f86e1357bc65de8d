"""What a vLLM request puts into its chunk keys besides the token ids (keys.py does the hashing).

Mirrors vLLM 0.32's own prefix-cache extra keys (``generate_block_hash_extra_keys`` in
``vllm/v1/core/kv_cache_utils.py``), per chunk instead of per block:

* LoRA: the adapter's name and a blake3 digest of its files (vLLM keys name and path; a path
  re-pointed at other weights, or an adapter reloaded in place, must not reuse KV, so we hash the
  weights themselves — once per adapter version, cached by file size and mtime);
* multimodal inputs: each input's identifier (vLLM's mm hash) and its placeholder position, in every
  chunk the placeholder overlaps;
* prompt embeddings: a digest of each chunk's slice of ``prompt_embeds`` (and of the token/embedding
  mask of mixed prompts); the token ids of embedding positions are vLLM's zero placeholders;
* ``cache_salt``.

A request this module cannot key safely (an input without an identifier, an adapter whose weights
cannot be read here, embeddings of the wrong shape) gets ``refused``: the connector neither loads
nor stores it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import blake3

from .keys import Placeholder, adapter_identity, encode_extras

_READ = 8 << 20


@dataclass(frozen=True)
class KeyInputs:
    tokens: list[int]
    salt: str | None = None
    adapter: bytes = b""
    extras: list[bytes] | None = None
    refused: str | None = None  # why this request cannot be keyed safely (None = it can)
    refused_feature: str | None = None  # which feature (a miss_reasons "refused" detail)


class Refused(Exception):
    """The request carries something the connector cannot put into a key; ``feature`` names it
    with a bounded word (a miss_reasons "refused" detail)."""

    def __init__(self, message: str, feature: str = "other") -> None:
        super().__init__(message)
        self.feature = feature


RECHECK_S = 2.0  # a known adapter's files are stat'ed again at most this often


class AdapterDigests:
    """Digests of LoRA adapters' files, computed once per adapter version (thread-safe).

    The connector asks from its lookup threads, never the scheduler's. A known adapter costs a
    dict lookup; its files are stat'ed again at most every ``recheck_s`` (weights rewritten in
    place get a new digest then) and hashed again only when their size, mtime or inode changed."""

    def __init__(self, recheck_s: float = RECHECK_S) -> None:
        self._lock = threading.Lock()
        self._recheck_s = recheck_s
        self._cache: dict[str, tuple[tuple, bytes, float]] = {}  # path -> (signature, digest, checked)
        self.hashed: list[tuple[str, int, float]] = []  # (path, bytes, seconds): for logs and tests

    def digest(self, path: str) -> bytes:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and now - cached[2] < self._recheck_s:
                return cached[1]
        files = _adapter_files(path)
        signature = tuple((rel, st.st_size, st.st_mtime_ns, st.st_ino) for rel, _, st in files)
        with self._lock:
            cached = self._cache.get(path)
            if cached is not None and cached[0] == signature:
                self._cache[path] = (signature, cached[1], now)
                return cached[1]
        t0 = time.perf_counter()
        h = blake3.blake3(b"kvpool-lora-files")
        total = 0
        for rel, full, st in files:
            h.update(rel.encode() + b"\0" + st.st_size.to_bytes(8, "little"))
            with open(full, "rb") as f:
                while chunk := f.read(_READ):
                    h.update(chunk)
                    total += len(chunk)
        digest = h.digest()
        with self._lock:
            self._cache[path] = (signature, digest, now)
            self.hashed.append((path, total, time.perf_counter() - t0))
        return digest


def _adapter_files(path: str) -> list[tuple[str, str, os.stat_result]]:
    """Every regular file of an adapter (a directory, or one file), sorted by relative path."""
    if not path:
        raise Refused("LoRA adapter without a path", "lora")
    if os.path.isfile(path):
        return [(os.path.basename(path), path, os.stat(path))]
    if not os.path.isdir(path):
        raise Refused("LoRA adapter whose weights are not a local file or directory", "lora")
    out = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(root, name)
            if os.path.isfile(full):
                out.append((os.path.relpath(full, path), full, os.stat(full)))
    if not out:
        raise Refused("LoRA adapter directory without files", "lora")
    return sorted(out)


def prompt_tokens(request: Any) -> list[int]:
    """The prompt's token ids as vLLM hashes them: zeros where embeddings stand in for tokens."""
    ids = request.prompt_token_ids
    n = int(request.num_prompt_tokens)
    if ids is None:
        return [0] * n
    mask = getattr(request, "prompt_is_token_ids", None)
    if mask is None:
        return list(ids)
    return [int(t) if is_tok else 0 for t, is_tok in zip(ids, mask, strict=True)]


def embeds_digests(request: Any, num_chunks: int, chunk_size: int) -> list[bytes] | None:
    """blake3 of each chunk's slice of the prompt embeddings (dtype and shape included)."""
    embeds = getattr(request, "prompt_embeds", None)
    if embeds is None:
        return None
    import torch

    if (
        not isinstance(embeds, torch.Tensor)
        or embeds.dim() != 2
        or embeds.shape[0] != request.num_prompt_tokens
    ):
        raise Refused("prompt embeddings of an unexpected type or shape", "prompt_embeds")
    mask = getattr(request, "prompt_is_token_ids", None)
    out = []
    for i in range(num_chunks):
        part = embeds[i * chunk_size : (i + 1) * chunk_size].detach().to("cpu").contiguous()
        h = blake3.blake3(b"kvpool-prompt-embeds")
        h.update(f"{part.dtype}|{tuple(part.shape)}".encode())
        h.update(part.view(torch.uint8).numpy().tobytes())
        if mask is not None:
            h.update(bytes(bool(x) for x in mask[i * chunk_size : (i + 1) * chunk_size]))
        out.append(h.digest())
    return out


def placeholders(request: Any) -> list[Placeholder]:
    out = []
    for feature in getattr(request, "mm_features", None) or ():
        identifier = getattr(feature, "identifier", None)
        pos = getattr(feature, "mm_position", None)
        if not identifier or pos is None:
            raise Refused("a multimodal input without an identifier", "multimodal")
        out.append(Placeholder(str(identifier), int(pos.offset), int(pos.length)))
    return out


def key_inputs(request: Any, chunk_size: int, adapters: AdapterDigests) -> KeyInputs:
    """Everything the chunk keys of ``request``'s prompt depend on, or why it cannot be keyed."""
    tokens = prompt_tokens(request)
    salt = getattr(request, "cache_salt", None)
    try:
        n = len(tokens) // chunk_size
        adapter = b""
        lora = getattr(request, "lora_request", None)
        if lora is not None:
            adapter = adapter_identity(str(lora.lora_name), adapters.digest(str(lora.lora_path or "")))
        extras = encode_extras(n, chunk_size, placeholders(request), embeds_digests(request, n, chunk_size))
    except Refused as exc:
        return KeyInputs(tokens=tokens, salt=salt, refused=str(exc), refused_feature=exc.feature)
    except OSError as exc:
        return KeyInputs(
            tokens=tokens,
            salt=salt,
            refused=f"LoRA adapter files unreadable ({exc.strerror})",
            refused_feature="lora",
        )
    return KeyInputs(tokens=tokens, salt=salt, adapter=adapter, extras=extras)
