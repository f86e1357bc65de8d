"""All layers of a block table between vLLM's paged KV cache and one chunk, in one call.

``gather_chunks`` copies paged blocks into a contiguous chunk, ``scatter_chunks`` the reverse, for
every layer at once. They run the compiled extension (``csrc/``, built into ``_kvcopy*.so`` by
``python csrc/build.py``) when it is built and can serve the call, and the plain-torch reference
otherwise; both move the same bytes. Every argument is checked before any byte moves: a bad call
raises ValueError and leaves the destination as it was.

The extension serves CPU caches, and CUDA caches when it was built with its CUDA kernels; there
the chunk is device memory or pinned host memory, which the kernel reads or writes directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

IMPLS = ("auto", "csrc", "torch")


def _load_extension():
    try:
        from . import _kvcopy  # type: ignore[attr-defined]
    except ImportError as exc:
        return None, f"not built ({exc}); build it with `python csrc/build.py`"
    built_for = _kvcopy.torch_version()
    if built_for != torch.__version__.split("+")[0]:
        return (
            None,
            f"built for torch {built_for}, this is {torch.__version__}; rebuild with `python csrc/build.py`",
        )
    return _kvcopy, None


_ext, _ext_error = _load_extension()
_logged: set[str] = set()
_log_lock = threading.Lock()


def extension_available() -> bool:
    """Whether the compiled extension is built and loaded."""
    return _ext is not None


def extension_status() -> str:
    """One line for logs: what the extension can serve, or why it is not used."""
    if _ext is None:
        return f"KV copy extension unavailable: {_ext_error}"
    return "KV copy extension loaded (CPU" + (" and CUDA kernels)" if _ext.cuda_built() else " kernels)")


class Layout(Protocol):
    name: str

    def block_view(self, kv: torch.Tensor) -> torch.Tensor: ...
    def chunk_view(self, chunk: torch.Tensor) -> torch.Tensor: ...


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The same memory as uint8 (the last dim scaled by the element size), as the extension takes it."""
    if t.dtype == torch.uint8:
        return t
    if t.dim() and t.stride(-1) != 1 and t.shape[-1] != 1:
        raise ValueError(f"the innermost dim must be contiguous, got strides {t.stride()}")
    return t.view(torch.uint8)


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_words(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the element's size, same shape: torch's copies then move
    bits, never values (fp8 has no index kernels, and a float copy may touch NaN payloads), at the
    speed of the native dtype (a uint8 view would copy byte by byte)."""
    return t.view(_WORDS[t.element_size()])


@dataclass(frozen=True, slots=True)
class _Copy:
    """A checked call: every layer's cache, layer 0 seen as bytes [B, S, N, H, D] (the view every
    layer shares), the block ids (int64, CPU), the chunk as given and as bytes [L, S, T, H, D]."""

    layout: Layout
    layers: list[torch.Tensor]
    pages: torch.Tensor
    ids: torch.Tensor
    chunk: torch.Tensor
    chunk_bytes: torch.Tensor
    device: torch.device

    def layer_words(self) -> list[torch.Tensor]:
        """Each layer's [B, S, N, H, D] block view, as words (the torch reference's view)."""
        return [as_words(self.layout.block_view(t)) for t in self.layers]

    def chunk_words(self) -> torch.Tensor:
        return as_words(self.layout.chunk_view(self.chunk))


def _layers(kv_caches: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(kv_caches, torch.Tensor):  # cross-layer: one tensor [layers, ...] holds them all
        if kv_caches.dim() < 2:
            raise ValueError(f"a cross-layer KV cache is [layers, blocks, ...], got {tuple(kv_caches.shape)}")
        return list(kv_caches.unbind(0))
    layers = list(kv_caches)
    if not layers or not all(isinstance(t, torch.Tensor) for t in layers):
        raise ValueError("kv_caches must be a non-empty list of tensors or one cross-layer tensor")
    return layers


def _block_ids(block_ids) -> torch.Tensor:
    if isinstance(block_ids, torch.Tensor):
        if block_ids.dim() != 1 or block_ids.dtype.is_floating_point or block_ids.dtype == torch.bool:
            raise ValueError(
                f"block ids must be a 1-D integer tensor, got {block_ids.dtype} {tuple(block_ids.shape)}"
            )
        return block_ids.to(device="cpu", dtype=torch.long).contiguous()
    try:
        return torch.tensor(list(block_ids), dtype=torch.long)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"block ids must be integers: {exc}") from None


def _check(layout: Layout, kv_caches, block_ids, chunk: torch.Tensor, scatter: bool) -> _Copy:
    layers = _layers(kv_caches)
    first = layers[0]
    for i, t in enumerate(layers[1:], 1):
        if (
            t.shape != first.shape
            or t.dtype != first.dtype
            or t.device != first.device
            or t.stride() != first.stride()
        ):
            raise ValueError(
                f"layer {i} is {tuple(t.shape)} {t.dtype} on {t.device} with strides {t.stride()}; "
                f"layer 0 is {tuple(first.shape)} {first.dtype} on {first.device} with strides {first.stride()}"
            )
    if chunk.dtype != first.dtype:
        raise ValueError(f"the chunk is {chunk.dtype}, the KV cache {first.dtype}")
    try:  # one view for all layers: they share shape, dtype and strides
        pages = as_bytes(layout.block_view(first))
        view = as_bytes(layout.chunk_view(chunk))
    except RuntimeError as exc:  # a view that this layout cannot take
        raise ValueError(f"{layout.name} layout: {exc}") from None
    ids = _block_ids(block_ids)
    blocks, planes, block_tokens, heads, dim = pages.shape
    num_layers, c_planes, tokens, c_heads, c_dim = view.shape
    if (num_layers, c_planes, c_heads, c_dim) != (len(layers), planes, heads, dim):
        raise ValueError(
            f"chunk {tuple(chunk.shape)} does not match {len(layers)} layers of {layout.name} "
            f"blocks {tuple(first.shape)} {first.dtype}"
        )
    count = ids.numel()
    if count == 0 or not (count - 1) * block_tokens < tokens <= count * block_tokens:
        raise ValueError(
            f"{tokens} tokens do not fit {count} blocks of {block_tokens} (only the last block may be partial)"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= blocks:
        bad = low if low < 0 else high
        raise ValueError(f"block id {bad} is out of range: the cache has {blocks} blocks")
    if scatter and torch.unique(ids).numel() != count:
        raise ValueError("a block id appears twice in a scatter")
    device = first.device
    if chunk.device != device and not (device.type == "cuda" and chunk.device.type == "cpu"):
        raise ValueError(f"a KV cache on {device} cannot take a chunk on {chunk.device}")
    return _Copy(layout, layers, pages, ids, chunk, view, device)


def _log_once(message: str) -> None:
    with _log_lock:
        if message in _logged:
            return
        _logged.add(message)
    log.info("kvpool: %s; using the torch reference for KV copies", message)


def _choose(impl: str, call: _Copy) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    reason = None
    if _ext is None:
        reason = extension_status()
    elif call.device.type == "cuda" and not _ext.cuda_built():
        reason = "the KV copy extension was built without CUDA kernels"
    elif call.device.type not in ("cpu", "cuda"):
        reason = f"the KV copy extension has no kernels for {call.device.type}"
    elif call.device.type == "cuda" and call.chunk.device.type == "cpu" and not call.chunk.is_pinned():
        reason = "the chunk is in pageable host memory (the CUDA kernel needs pinned memory)"
    if reason is None:
        return "csrc"
    if impl == "csrc":
        raise RuntimeError(reason)
    _log_once(reason)
    return "torch"


def _finish(call: _Copy, non_blocking: bool) -> None:
    if call.device.type == "cuda" and not non_blocking:
        torch.cuda.current_stream(call.device).synchronize()


def gather_chunks(
    layout: Layout,
    kv_caches: Sequence[torch.Tensor] | torch.Tensor,
    block_ids,
    out: torch.Tensor,
    *,
    impl: str = "auto",
    non_blocking: bool = False,
) -> str:
    """Copy the KV of ``block_ids`` (kernel blocks, in order) of every layer into ``out``.

    ``kv_caches`` is a list of per-layer caches, or one cross-layer tensor ``[layers, ...]``.
    ``out`` is ``layout.chunk_shape(...)``: ``[layers, 2, tokens, heads, dim]`` (``[layers,
    tokens, latent]`` for MLA), any view whose innermost dim is contiguous; ``tokens`` may end
    inside the last block. On CUDA the copy runs on the current stream; with ``non_blocking`` the
    caller synchronises before reading a host ``out``. Returns "csrc" or "torch": what ran.
    """
    call = _check(layout, kv_caches, block_ids, out, scatter=False)
    which = _choose(impl, call)
    if which == "csrc":
        _ext.copy_blocks(call.layers, call.pages, call.ids, call.chunk_bytes, True)
    else:
        _gather_reference(call, non_blocking)
    _finish(call, non_blocking)
    return which


def scatter_chunks(
    layout: Layout,
    kv_caches: Sequence[torch.Tensor] | torch.Tensor,
    block_ids,
    src: torch.Tensor,
    *,
    impl: str = "auto",
    non_blocking: bool = False,
) -> str:
    """Copy ``src`` (shaped as ``gather_chunks``'s ``out``) into the pages of ``block_ids`` of
    every layer. Block ids must be distinct; tokens past the end of ``src`` in a partial last
    block are left as they were. With ``non_blocking`` on CUDA, ``src`` must stay untouched until
    the current stream has run the copy. Returns "csrc" or "torch": what ran."""
    call = _check(layout, kv_caches, block_ids, src, scatter=True)
    which = _choose(impl, call)
    if which == "csrc":
        _ext.copy_blocks(call.layers, call.pages, call.ids, call.chunk_bytes, False)
    else:
        _scatter_reference(call, non_blocking)
    _finish(call, non_blocking)
    return which


def _gather_reference(call: _Copy, non_blocking: bool) -> None:
    ids = call.ids.to(call.device)
    chunk = call.chunk_words()
    tokens = chunk.shape[2]
    for page, dst in zip(call.layer_words(), chunk, strict=True):
        blocks = page.index_select(0, ids)  # [k, S, N, H, D]
        k, s, n, h, d = blocks.shape
        dst.copy_(blocks.transpose(0, 1).reshape(s, k * n, h, d)[:, :tokens], non_blocking=non_blocking)


def _scatter_reference(call: _Copy, non_blocking: bool) -> None:
    count = call.ids.numel()
    chunk = call.chunk_words()
    _l, s, tokens, h, d = chunk.shape
    n = call.pages.shape[2]
    full = count if tokens == count * n else count - 1
    ids = call.ids[:full].to(call.device)
    last = int(call.ids[-1])
    for page, src in zip(call.layer_words(), chunk, strict=True):
        src = src.to(call.device, non_blocking=non_blocking)
        if full:
            page.index_copy_(0, ids, src[:, : full * n].reshape(s, full, n, h, d).transpose(0, 1))
        if full < count:
            page[last, :, : tokens - full * n].copy_(src[:, full * n :])
