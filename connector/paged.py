"""Copy KV between vLLM's paged cache and kvpool's chunk layout, in plain torch.

vLLM 0.32 hands every attention layer's cache to connectors as a logical ``[B, H, N, C]`` view
(blocks, KV heads, tokens per kernel block, content) with ``C = 2 * head_dim``. What C means
differs per backend, which is why there is one small adapter per backend:

* ``cpu`` (CPU_ATTN): each (block, head) page is K ``[N, D]`` followed by V ``[N, D]``; the kernel
  reinterprets the page as ``[2N, D]``. So the physical page is ``[2, N, D]``.
* ``flash`` (FLASH_ATTN on GPUs): each token row holds K then V: ``C = [K(D) | V(D)]``; the
  physical strides may be permuted (e.g. LBNHC), but the logical view indexes the same way.

kvpool's chunk layout is ``[layers, 2, tokens, kv_heads, head_dim]`` (chunkfmt.LAYOUT_LKTHD); one
layer's slice is ``[2, tokens, H, D]``. ``gather`` reads a list of kernel blocks into that slice,
``scatter`` writes it back; both are exact byte copies, so scatter(gather(x)) == x.
"""

from __future__ import annotations

import torch


class PagedLayout:
    """One backend's interpretation of the per-layer ``[B, H, N, 2D]`` view."""

    name = "base"

    def pages(self, kv: torch.Tensor) -> torch.Tensor:
        """A ``[B, H, N, 2, D]``-indexable 5-D view whose axes the subclasses name."""
        raise NotImplementedError

    # the permutations between the 5-D page view (as indexed by block) and [2, k, N, H, D]
    _to_chunk: tuple[int, ...] = ()
    _to_pages: tuple[int, ...] = ()

    def gather(self, kv: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """KV of ``block_ids`` (kernel blocks, in order) as ``[2, len*N, H, D]`` (a new tensor)."""
        sel = self.pages(kv).index_select(0, block_ids).permute(*self._to_chunk)
        two, k, n, h, d = sel.shape
        return sel.reshape(two, k * n, h, d)

    def scatter(self, kv: torch.Tensor, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Write ``src`` ``[2, len*N, H, D]`` into the pages of ``block_ids`` (in place)."""
        pages = self.pages(kv)
        n = kv.shape[2]
        two, t, h, d = src.shape
        if t != block_ids.numel() * n:
            raise ValueError(f"{t} tokens do not fill {block_ids.numel()} blocks of {n}")
        src = src.to(device=kv.device, dtype=kv.dtype).reshape(two, -1, n, h, d).permute(*self._to_pages)
        pages.index_copy_(0, block_ids, src)


class CpuLayout(PagedLayout):
    name = "cpu"
    _to_chunk = (2, 0, 3, 1, 4)  # [k, H, 2, N, D] -> [2, k, N, H, D]
    _to_pages = (1, 3, 0, 2, 4)  # [2, k, N, H, D] -> [k, H, 2, N, D]

    def pages(self, kv: torch.Tensor) -> torch.Tensor:
        b, h, n, c = kv.shape
        return kv.view(b, h, 2, n, c // 2)


class FlashLayout(PagedLayout):
    name = "flash"
    _to_chunk = (3, 0, 2, 1, 4)  # [k, H, N, 2, D] -> [2, k, N, H, D]
    _to_pages = (1, 3, 2, 0, 4)  # [2, k, N, H, D] -> [k, H, N, 2, D]

    def pages(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.unflatten(-1, (2, kv.shape[-1] // 2))


LAYOUTS: dict[str, type[PagedLayout]] = {"cpu": CpuLayout, "flash": FlashLayout}


def kernel_block_ids(block_ids: list[int], ratio: int) -> list[int]:
    """Scheduler (manager) blocks → kernel blocks: vLLM may split one manager block of
    ``ratio * N`` tokens into ``ratio`` consecutive kernel blocks of N tokens."""
    if ratio == 1:
        return list(block_ids)
    return [b * ratio + i for b in block_ids for i in range(ratio)]
