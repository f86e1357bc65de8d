"""Gather/scatter between vLLM's paged KV views and the chunk layout, for both backends.

The reference semantics are written out independently here (per token, per head) from how each
backend's attention kernel reads its cache, so a wrong permutation in paged.py cannot pass.
"""

from __future__ import annotations

import pytest
import torch

from kvpool.connector.paged import CpuLayout, FlashLayout, MlaLayout, kernel_block_ids

B, H, N, D = 6, 2, 4, 8


def _cpu_kv_at(kv, block, head, tok):
    # CPU_ATTN: page [N, 2D] reinterpreted as [2N, D]; K rows 0..N-1, V rows N..2N-1
    page = kv[block, head].reshape(2 * N, D)
    return page[tok], page[N + tok]


def _flash_kv_at(kv, block, head, tok):
    # FLASH_ATTN: key = kv[..., :D], value = kv[..., D:]
    row = kv[block, head, tok]
    return row[:D], row[D:]


@pytest.mark.parametrize(
    "layout,kv_at,make",
    [
        (CpuLayout(), _cpu_kv_at, lambda: torch.randn(B, H, N, 2 * D)),
        (FlashLayout(), _flash_kv_at, lambda: torch.randn(B, H, N, 2 * D)),
        # flash with a permuted physical layout (LBNHC: tokens outside heads)
        (FlashLayout(), _flash_kv_at, lambda: torch.randn(B, N, H, 2 * D).transpose(1, 2)),
    ],
)
def test_gather_matches_backend_semantics_and_scatter_inverts(layout, kv_at, make):
    kv = make()
    ids = torch.tensor([4, 1, 3])
    chunk = layout.gather(kv, ids)
    assert chunk.shape == (2, 3 * N, H, D)
    for i, blk in enumerate(ids.tolist()):
        for tok in range(N):
            for head in range(H):
                k, v = kv_at(kv, blk, head, tok)
                assert torch.equal(chunk[0, i * N + tok, head], k)
                assert torch.equal(chunk[1, i * N + tok, head], v)
    # scatter into other blocks of a fresh cache, gather back: exact bytes, other blocks untouched
    dst = torch.zeros_like(kv)
    other = torch.tensor([0, 5, 2])
    layout.scatter(dst, other, chunk)
    assert torch.equal(layout.gather(dst, other), chunk)
    for blk in (1, 3, 4):
        assert torch.count_nonzero(dst[blk]) == 0
    for i, blk in enumerate(other.tolist()):
        for tok in range(N):
            k, v = kv_at(dst, blk, 1, tok)
            assert torch.equal(k, chunk[0, i * N + tok, 1]) and torch.equal(v, chunk[1, i * N + tok, 1])


def test_bf16_round_trip_is_bytewise():
    kv = torch.randn(B, H, N, 2 * D).to(torch.bfloat16)
    ids = torch.tensor([2, 0])
    for layout in (CpuLayout(), FlashLayout()):
        dst = torch.zeros_like(kv)
        layout.scatter(dst, ids, layout.gather(kv, ids))
        assert torch.equal(dst[ids], kv[ids])


def test_scatter_rejects_wrong_token_count():
    kv = torch.zeros(B, H, N, 2 * D)
    with pytest.raises(ValueError):
        CpuLayout().scatter(kv, torch.tensor([0, 1]), torch.zeros(2, N, H, D))


def test_kernel_block_ids():
    assert kernel_block_ids([3, 1], 1) == [3, 1]
    assert kernel_block_ids([3, 1], 2) == [6, 7, 2, 3]


def test_mla_gather_is_the_latent_row_of_each_token_and_scatter_inverts():
    latent = 12
    kv = torch.randn(B, N, latent)  # MLA: one latent row per token, no heads, no K/V split
    ids = torch.tensor([5, 0, 2])
    layout = MlaLayout()
    chunk = layout.gather(kv, ids)
    assert chunk.shape == (3 * N, latent)
    for i, blk in enumerate(ids.tolist()):
        for tok in range(N):
            assert torch.equal(chunk[i * N + tok], kv[blk, tok])
    dst = torch.zeros(B, 1, N, latent)  # vLLM's 4-D view of the same cache ([B, 1, N, L])
    layout.scatter(dst, torch.tensor([1, 3, 4]), chunk)
    assert torch.equal(dst[[1, 3, 4], 0].reshape(3 * N, latent), chunk)
    assert torch.count_nonzero(dst[[0, 2, 5]]) == 0


def test_fp8_round_trip_is_bytewise():
    raw = torch.randint(0, 256, (B, H, N, 2 * D), dtype=torch.uint8)  # NaN patterns included
    kv = raw.view(torch.float8_e4m3fn)
    ids = torch.tensor([3, 1])
    for layout in (CpuLayout(), FlashLayout()):
        dst = torch.zeros_like(kv)
        layout.scatter(dst, ids, layout.gather(kv, ids))
        assert torch.equal(dst.view(torch.uint8)[ids], raw[ids])
