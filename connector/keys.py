"""Chained chunk keys: which stored KV belongs to which text, for which model.

Pure logic, no I/O. A key must be identical in every process that sees the same model and tokens
(so engines share) and different whenever the KV could differ (so no engine ever loads KV computed
for another model, layout, rank, tenant or prefix). Hence blake3 over a canonical byte encoding,
never Python's ``hash()``: every input below is encoded explicitly, length-prefixed, little endian.

key(i) = blake3( "kvpool-chunk" | format version | fingerprint digest | salt | adapter |
                 key(i-1) | tokens(i) | extras(i) )

The parent key chains a chunk to everything before it: the same 256 tokens after a different prefix
have different KV (attention sees the prefix), so they must have a different key. A partial tail
(fewer than ``chunk_size`` tokens) gets no key: it is recomputed, never stored (DESIGN.md §3).

Besides the tokens, whatever else changes the KV of those tokens is in the key, the way vLLM's own
block hashes carry it (``vllm/v1/core/kv_cache_utils.py``, the extra keys): the LoRA adapter of the
request (``adapter``: its name and a digest of its weights, for every chunk), and per chunk
(``extras``) the multimodal inputs whose placeholder tokens overlap the chunk and the digest of the
chunk's prompt embeddings. A chunk after an image depends on the image through its parent key.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import blake3
import numpy as np

KEY_FORMAT_VERSION = 2
KEY_SIZE = 32
_DOMAIN = b"kvpool-chunk"
_ROOT_PARENT = b"\x00" * KEY_SIZE


def _field(value: bytes) -> bytes:
    """Length-prefix a field so that no two different field lists encode to the same bytes."""
    return struct.pack("<I", len(value)) + value


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything about the engine that changes the bytes of a chunk's KV.

    ``kv_layout`` names the chunk layout and device; ``attn_backend`` the attention backend that
    produced it (two backends may compute slightly different KV for the same text, so they do not
    share chunks). ``kv_quant`` stands for the KV cache quantisation: the per-layer cache dtypes and
    k/v scales ("none" when the cache is not quantised). ``model_dtype`` is the dtype the model
    computes in and ``config_digest`` a digest of the model config (rope scaling and other
    overrides change K without changing the model name).

    The model is identified by content (connector/model_identity.py): ``weights`` is the hub
    snapshot's commit or a blake3 of the weight files, never a path. ``model`` is only a name for
    humans (the ``model_id`` setting, "" by default): two names never share, but one name never
    makes two weight sets share. ``revision`` is superseded by ``weights`` (left ""). The software
    and device that computed the KV change its bits too: ``vllm_version``, ``torch_version``,
    ``cuda_version``, ``device_capability`` (e.g. "cuda:9.0", "cpu:x86_64:AVX512") and
    ``attn_variant`` (e.g. "fa3"; "" for backends without variants).
    """

    model: str
    revision: str
    kv_dtype: str
    kv_layout: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    attn_backend: str = ""
    kv_quant: str = ""
    model_dtype: str = ""
    config_digest: str = ""
    weights: str = ""
    vllm_version: str = ""
    torch_version: str = ""
    cuda_version: str = ""
    device_capability: str = ""
    attn_variant: str = ""

    IDENTITY_FIELDS = (
        "weights",
        "vllm_version",
        "torch_version",
        "cuda_version",
        "device_capability",
        "attn_variant",
    )
    """The fields a worker measures about itself at start-up (connector/model_identity.py)."""

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "tp_size", "pp_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size):
            raise ValueError("rank out of range")

    @cached_property
    def digest(self) -> bytes:
        """32 bytes that stand for the whole fingerprint (field order fixed, names included)."""
        h = blake3.blake3(b"kvpool-fingerprint")
        for name, value in sorted(asdict(self).items()):
            h.update(_field(name.encode()))
            h.update(_field(str(value).encode()))
        return h.digest()

    def for_rank(self, tp_rank: int, pp_rank: int) -> ModelFingerprint:
        """The same engine seen from another worker: each TP/PP rank stores its own shard."""
        d = asdict(self)
        d.update(tp_rank=tp_rank, pp_rank=pp_rank)
        return ModelFingerprint(**d)


def num_full_chunks(num_tokens: int, chunk_size: int) -> int:
    return num_tokens // chunk_size


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """The ids as little-endian u32. A list goes through ``array``, which range-checks as it
    packs: about 3x faster than numpy's conversion of Python ints, on the scheduler's thread."""
    if not isinstance(tokens, np.ndarray):
        try:
            packed = array.array("I", tokens)
        except OverflowError:
            raise ValueError("token ids must fit in 32 bits") from None
        if sys.byteorder != "little":
            packed.byteswap()
        return packed.tobytes()
    wide = tokens.astype(np.int64, copy=False)
    if wide.size and (wide.min() < 0 or wide.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in 32 bits")
    return wide.astype("<u4").tobytes()


def chunk_keys(
    fingerprint: ModelFingerprint,
    token_ids: Sequence[int] | np.ndarray,
    salt: str | bytes | None = None,
    max_chunks: int | None = None,
    adapter: bytes = b"",
    extras: Sequence[bytes] | None = None,
) -> list[bytes]:
    """Keys of the full chunks of ``token_ids`` in order; the partial tail gets none.

    ``adapter`` identifies the LoRA adapter (b"" = none); ``extras[i]`` is chunk i's encoded extra
    inputs (``encode_extras``; None = none for every chunk). ``max_chunks`` stops early (a caller
    that needs only a prefix pays only for it).
    """
    size = fingerprint.chunk_size
    n = num_full_chunks(len(token_ids), size)
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        return []
    if extras is not None and len(extras) < n:
        raise ValueError(f"{len(extras)} chunk extras for {n} chunks")
    raw = _token_bytes(token_ids[: n * size])
    salt_bytes = salt.encode() if isinstance(salt, str) else (salt or b"")
    head = blake3.blake3(_DOMAIN)
    head.update(struct.pack("<I", KEY_FORMAT_VERSION))
    head.update(_field(fingerprint.digest))
    # A missing salt and an empty salt mean the same thing: no tenant isolation.
    head.update(_field(salt_bytes))
    head.update(_field(adapter))
    keys: list[bytes] = []
    parent = _ROOT_PARENT
    step = size * 4
    for i in range(n):
        h = head.copy()
        h.update(parent)
        h.update(struct.pack("<I", size))
        h.update(raw[i * step : (i + 1) * step])
        h.update(_field(extras[i] if extras is not None else b""))
        parent = h.digest()
        keys.append(parent)
    return keys


# -- extra key inputs (pure; connector/request_keys.py reads them from vLLM's request) -----------


@dataclass(frozen=True)
class Placeholder:
    """Where a multimodal input's placeholder tokens sit in the prompt, and what fills them."""

    identifier: str  # vLLM's mm hash (or the user's uuid) of the input
    offset: int
    length: int


def adapter_identity(name: str, weights_digest: bytes) -> bytes:
    """The ``adapter`` key input for a LoRA adapter: its name and a digest of its weight files."""
    return _field(b"lora") + _field(name.encode()) + _field(weights_digest)


def encode_extras(
    num_chunks: int,
    chunk_size: int,
    placeholders: Sequence[Placeholder] = (),
    embeds_digests: Sequence[bytes] | None = None,
) -> list[bytes] | None:
    """Per-chunk extra key inputs; None when the request has none (plain token prompts).

    A placeholder is listed in every chunk its tokens overlap, with its offset relative to the
    chunk start (as vLLM does per block), so the same image at another position, or another image
    on the same placeholder tokens, gives other keys from that chunk on.
    """
    if not placeholders and embeds_digests is None:
        return None
    if embeds_digests is not None and len(embeds_digests) < num_chunks:
        raise ValueError(f"{len(embeds_digests)} embedding digests for {num_chunks} chunks")
    out: list[bytes] = []
    for i in range(num_chunks):
        start, end = i * chunk_size, (i + 1) * chunk_size
        parts: list[bytes] = []
        for p in placeholders:
            if p.offset < end and p.offset + p.length > start:
                parts += [
                    _field(b"mm"),
                    _field(p.identifier.encode()),
                    struct.pack("<qI", p.offset - start, p.length),
                ]
        if embeds_digests is not None:
            parts += [_field(b"prompt_embeds"), _field(embeds_digests[i])]
        out.append(b"".join(parts))
    return out
