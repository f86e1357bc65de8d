"""The model and paged cache of `kvpool bench ttft`'s GPU figure (ttft_gpu.py), in plain PyTorch.

A Llama-3-8B-shaped decoder (32 layers, hidden 4096, 32 query heads, 8 KV heads, head dim 128,
SwiGLU 14336, bf16, random weights). Attention is PyTorch's SDPA with its own grouped-query
support (``enable_gqa``: the KV heads are not copied per query head) and its fused kernels where
the device has them (see ``Model._attend`` for the fallback). One ``forward`` serves every step: the whole prompt from position 0 (the
cache off), the part of a prompt after the tokens loaded from the pool (causal, aligned to the
end: each new token attends to every cached one and to the new ones before it), and decoding.
Each step writes its tokens' K and V into a paged cache as vLLM keeps it (FLASH_ATTN's
``[blocks, heads, block tokens, 2·head dim]`` view, NHD pages) and reads the earlier tokens'
back from it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

BLOCK = 16  # tokens per block, vLLM's default on GPUs
GQA = "sdpa enable_gqa"
REPEAT = "sdpa, KV heads repeated (no fused SDPA kernel took enable_gqa here)"


@dataclass(frozen=True)
class Shape:
    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    ffn: int = 14336
    vocab: int = 128256
    rope_theta: float = 500000.0


LLAMA3_8B = Shape()


class PagedKV:
    """Per-layer paged caches in vLLM 0.32's FLASH_ATTN view (NHD pages), and one request's blocks."""

    def __init__(self, shape: Shape, tokens: int, device: torch.device, dtype: torch.dtype, seed: int = 1):
        s = shape
        self.blocks = -(-tokens // BLOCK)
        g = torch.Generator().manual_seed(seed)
        self.block_ids = torch.randperm(self.blocks, generator=g).tolist()  # any block table
        self.layers = [
            torch.zeros(self.blocks, BLOCK, s.kv_heads, 2 * s.head_dim, device=device, dtype=dtype).permute(
                0, 2, 1, 3
            )
            for _ in range(s.layers)
        ]
        self._slots = (
            torch.tensor(self.block_ids, device=device)[:, None] * BLOCK + torch.arange(BLOCK, device=device)
        ).flatten()[:tokens]
        self.tokens, self.s = tokens, s

    def _pages(self, layer: int) -> torch.Tensor:  # [blocks * BLOCK, kv heads, 2 * head dim]
        return self.layers[layer].permute(0, 2, 1, 3).reshape(-1, self.s.kv_heads, 2 * self.s.head_dim)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K and V of tokens [start, start + len(k))."""
        self._pages(layer)[self._slots[start : start + k.shape[0]]] = torch.cat([k, v], -1)

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of tokens [0, end)."""
        kv = self._pages(layer)[self._slots[:end]]
        return kv[..., : self.s.head_dim], kv[..., self.s.head_dim :]

    def clear(self) -> None:
        for t in self.layers:
            t.zero_()


class Model:
    """A decoder with random weights; enough of Llama to cost what Llama's prefill costs."""

    def __init__(
        self, shape: Shape, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0
    ):
        self.s, self.device, self.dtype = shape, device, dtype
        g = torch.Generator(device=device).manual_seed(seed)

        def w(*dims: int) -> torch.Tensor:
            return (torch.randn(*dims, generator=g, device=device, dtype=torch.float32) * 0.02).to(dtype)

        s = shape
        self.embed = w(s.vocab, s.hidden)
        self.layers = [
            {
                "qkv": w((s.heads + 2 * s.kv_heads) * s.head_dim, s.hidden),
                "o": w(s.hidden, s.heads * s.head_dim),
                "gate_up": w(2 * s.ffn, s.hidden),
                "down": w(s.hidden, s.ffn),
            }
            for _ in range(s.layers)
        ]
        self.head = w(s.vocab, s.hidden)
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        self._inv_freq = inv
        self.attention = GQA

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        cos, sin = freqs.cos()[:, None, :].to(x.dtype), freqs.sin()[:, None, :].to(x.dtype)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)

    def _qkv(self, layer: dict, h: torch.Tensor, positions: torch.Tensor):
        s = self.s
        qkv = self._norm(h) @ layer["qkv"].T
        q, k, v = qkv.split([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim], -1)
        q = self._rope(q.view(-1, s.heads, s.head_dim), positions)
        k = self._rope(k.view(-1, s.kv_heads, s.head_dim), positions)
        return q, k, v.view(-1, s.kv_heads, s.head_dim)

    def _finish_layer(self, layer: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = h + attn.reshape(h.shape[0], -1) @ layer["o"].T
        gate, up = (self._norm(h) @ layer["gate_up"].T).chunk(2, -1)
        return h + (F.silu(gate) * up) @ layer["down"].T

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of the last ``len(q)`` positions over all ``len(k)`` (aligned to the
        end). Grouped-query heads by SDPA itself; on CUDA only its fused kernels may run (the
        math fallback would materialise the attention matrix: 64 GiB at 32k tokens), and where
        none takes ``enable_gqa`` the KV heads are repeated instead, from then on (``attention``
        says which)."""
        n, total = q.shape[0], k.shape[0]
        mask = {"is_causal": True} if n == total else {"attn_mask": causal_lower_right(n, total)}
        q = q.transpose(0, 1)[None]
        if self.attention == GQA:
            try:
                with self._fused_only():
                    out = F.scaled_dot_product_attention(
                        q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], enable_gqa=True, **mask
                    )
                return out[0].transpose(0, 1)
            except RuntimeError:
                self.attention = REPEAT
        group = self.s.heads // self.s.kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(q, k.transpose(0, 1)[None], v.transpose(0, 1)[None], **mask)
        return out[0].transpose(0, 1)

    def _fused_only(self):
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(
            [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        )

    def forward(self, ids: torch.Tensor, start: int, kv: PagedKV) -> torch.Tensor:
        """Logits of the last of ``ids``, the tokens at positions [start, start + len(ids)): their
        K and V are written into ``kv``, and they attend to the ``start`` tokens already there."""
        positions = torch.arange(start, start + ids.numel(), device=self.device)
        h = self.embed[ids]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, positions)
            kv.write(i, start, k, v)
            if start:
                past_k, past_v = kv.read(i, start)
                k, v = torch.cat([past_k, k]), torch.cat([past_v, v])
            h = self._finish_layer(layer, h, self._attend(q, k, v))
        return self._norm(h[-1:]) @ self.head.T
