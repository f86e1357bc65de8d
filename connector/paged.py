"""Copy KV between vLLM's paged cache and kvpool's chunk layout; the plain-torch reference.

vLLM 0.32 hands every attention layer's cache to connectors as a logical ``[B, H, N, C]`` view
(blocks, KV heads, tokens per kernel block, content) with ``C = 2 * head_dim``, whatever the
physical stride order (``KVCacheLayout``: LBHNC, LBNHC, or a cross-layer order such as BLHNC where
one tensor holds all layers block by block). What C means differs per backend, which is why there
is one small adapter per backend:

* ``cpu`` (CPU_ATTN): each (block, head) page is K ``[N, D]`` followed by V ``[N, D]``; the kernel
  reinterprets the page as ``[2N, D]``. So the physical page is ``[2, N, D]``.
* ``flash`` (FLASH_ATTN on GPUs): each token row holds K then V: ``C = [K(D) | V(D)]``; the
  physical strides may be permuted (e.g. LBNHC), but the logical view indexes the same way.
* ``mla`` (MLA backends): one latent row per token, ``[B, N, L]`` (or ``[B, 1, N, L]``).

Each adapter exposes its cache as a strided 5-D block view ``[B, S, N, H, D]`` (blocks, K/V planes
— 2, or 1 for MLA —, tokens, heads, dim) without copying. kvpool's chunk layout is
``[layers, 2, tokens, kv_heads, head_dim]`` (chunkfmt.LAYOUT_LKTHD; ``[layers, tokens, L]`` for MLA).
``gather``/``scatter`` move one layer; ``gather_chunks``/``scatter_chunks`` move all layers of a
block table in one call, through the compiled extension when it is built (kvcopy.py). All of them
copy bytes, so scatter(gather(x)) == x for every dtype, fp8 included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import kvcopy


class PagedLayout:
    """One backend's interpretation of a layer's paged KV cache."""

    name = "base"

    def block_view(self, kv: torch.Tensor) -> torch.Tensor:
        """``kv`` as a ``[B, S, N, H, D]`` view (no copy) in the chunk's axis order."""
        raise NotImplementedError

    def chunk_view(self, chunk: torch.Tensor) -> torch.Tensor:
        """An all-layers chunk as a ``[layers, S, tokens, H, D]`` view."""
        if chunk.dim() != 5:
            raise ValueError(
                f"a {self.name} chunk is [layers, 2, tokens, heads, dim], got {tuple(chunk.shape)}"
            )
        return chunk

    def chunk_shape(self, kv: torch.Tensor, num_layers: int, tokens: int) -> tuple[int, ...]:
        """Shape of an all-layers chunk of ``tokens`` tokens for caches shaped like ``kv``."""
        _b, s, _n, h, d = self.block_view(kv).shape
        return (num_layers, s, tokens, h, d)

    def _layer_chunk(self, planes: torch.Tensor) -> torch.Tensor:
        """``[S, tokens, H, D]`` → the shape ``gather`` returns for one layer."""
        return planes

    def gather(self, kv: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """KV of ``block_ids`` (kernel blocks, in order) as one layer's chunk (a new tensor):
        ``[2, len*N, H, D]``, or ``[len*N, L]`` for MLA."""
        blocks = kvcopy.as_words(self.block_view(kv)).index_select(0, block_ids.to(kv.device))
        k, s, n, h, d = blocks.shape
        planes = blocks.transpose(0, 1).reshape(s, k * n, h, d).view(kv.dtype)
        return self._layer_chunk(planes)

    def scatter(self, kv: torch.Tensor, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Write one layer's chunk ``src`` (as ``gather`` returns it) into the pages of ``block_ids``."""
        view = self.block_view(kv)
        _b, s, n, h, d = view.shape
        if src.numel() != s * block_ids.numel() * n * h * d:
            raise ValueError(f"{tuple(src.shape)} does not fill {block_ids.numel()} blocks of {n} tokens")
        src = src.to(device=kv.device, dtype=kv.dtype).reshape(s, -1, n, h, d).transpose(0, 1)
        kvcopy.as_words(view).index_copy_(0, block_ids.to(kv.device), kvcopy.as_words(src))

    def gather_chunks(
        self, kv_caches: Sequence[torch.Tensor] | torch.Tensor, block_ids, out: torch.Tensor, **kwargs
    ) -> str:
        """All layers of ``block_ids`` into ``out`` (see kvcopy.gather_chunks); returns the
        implementation that ran ("csrc" or "torch")."""
        return kvcopy.gather_chunks(self, kv_caches, block_ids, out, **kwargs)

    def scatter_chunks(
        self, kv_caches: Sequence[torch.Tensor] | torch.Tensor, block_ids, src: torch.Tensor, **kwargs
    ) -> str:
        """``src`` into all layers' pages of ``block_ids`` (see kvcopy.scatter_chunks)."""
        return kvcopy.scatter_chunks(self, kv_caches, block_ids, src, **kwargs)


class CpuLayout(PagedLayout):
    name = "cpu"

    def block_view(self, kv: torch.Tensor) -> torch.Tensor:
        b, h, n, c = _dims(kv, 4, self.name)
        return kv.view(b, h, 2, n, c // 2).permute(0, 2, 3, 1, 4)  # [B, H, 2, N, D] -> [B, 2, N, H, D]


class FlashLayout(PagedLayout):
    name = "flash"

    def block_view(self, kv: torch.Tensor) -> torch.Tensor:
        _dims(kv, 4, self.name)
        # [B, H, N, 2, D] -> [B, 2, N, H, D]
        return kv.unflatten(-1, (2, kv.shape[-1] // 2)).permute(0, 3, 2, 1, 4)


class MlaLayout(PagedLayout):
    name = "mla"

    def block_view(self, kv: torch.Tensor) -> torch.Tensor:
        if kv.dim() == 4 and kv.shape[1] == 1:
            kv = kv.squeeze(1)
        _dims(kv, 3, self.name)
        return kv[:, None, :, None, :]  # [B, N, L] -> [B, 1, N, 1, L]

    def chunk_view(self, chunk: torch.Tensor) -> torch.Tensor:
        if chunk.dim() != 3:
            raise ValueError(f"an mla chunk is [layers, tokens, latent], got {tuple(chunk.shape)}")
        return chunk[:, None, :, None, :]

    def chunk_shape(self, kv: torch.Tensor, num_layers: int, tokens: int) -> tuple[int, ...]:
        return (num_layers, tokens, self.block_view(kv).shape[-1])

    def _layer_chunk(self, planes: torch.Tensor) -> torch.Tensor:
        return planes[0, :, 0]


def _dims(kv: torch.Tensor, ndim: int, name: str) -> tuple[int, ...]:
    if kv.dim() != ndim or (name != "mla" and kv.shape[-1] % 2):
        want = "[blocks, tokens, latent]" if name == "mla" else "[blocks, heads, tokens, 2 * head_dim]"
        raise ValueError(f"a {name} KV cache layer is {want}, got {tuple(kv.shape)}")
    return tuple(kv.shape)


LAYOUTS: dict[str, type[PagedLayout]] = {"cpu": CpuLayout, "flash": FlashLayout, "mla": MlaLayout}


def kernel_block_ids(block_ids: list[int], ratio: int) -> list[int]:
    """Scheduler (manager) blocks → kernel blocks: vLLM may split one manager block of
    ``ratio * N`` tokens into ``ratio`` consecutive kernel blocks of N tokens."""
    if ratio == 1:
        return list(block_ids)
    return [b * ratio + i for b in block_ids for i in range(ratio)]
