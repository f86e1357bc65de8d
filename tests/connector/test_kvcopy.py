"""All-layers gather/scatter (connector/kvcopy.py): the compiled extension beside the torch reference.

Caches are laid out the ways vLLM 0.32 lays them out (its KVCacheLayout stride orders, cross-layer
tensors, padded pages, MLA) and built from one flat buffer of random bytes, so the tests compare
bytes — NaN patterns of every dtype included — and can see a write that strays outside the blocks
it was asked for. CUDA cases run only where a GPU is present.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from kvpool.connector import kvcopy
from kvpool.connector.paged import LAYOUTS, PagedLayout

from ..needs import csrc_extension

as_bytes = kvcopy.as_bytes

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2]


@dataclass
class Cache:
    layout: PagedLayout
    arg: list[torch.Tensor] | torch.Tensor  # what gather_chunks takes: per-layer list or cross-layer tensor
    layers: list[torch.Tensor]  # the per-layer logical views
    raw: torch.Tensor  # every byte of the cache


def _raw(nbytes: int, fill: int | None, gen: torch.Generator) -> torch.Tensor:
    if fill is None:
        return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return torch.full((nbytes,), fill, dtype=torch.uint8)


# name -> (layout, physical shape from (L, B, H, N, C), how to get [L, B, H, N, C] from it, cross-layer?)
CASES = {
    "cpu-LBHNC": ("cpu", lambda L, B, H, N, C: (L, B, H, N, C), lambda t: t, False),
    "flash-LBHNC": ("flash", lambda L, B, H, N, C: (L, B, H, N, C), lambda t: t, False),
    "flash-LBNHC": ("flash", lambda L, B, H, N, C: (L, B, N, H, C), lambda t: t.transpose(2, 3), False),
    "flash-BLHNC-cross": ("flash", lambda L, B, H, N, C: (B, L, H, N, C), lambda t: t.transpose(0, 1), True),
    "flash-BLNHC-cross": (
        "flash",
        lambda L, B, H, N, C: (B, L, N, H, C),
        lambda t: t.permute(1, 0, 3, 2, 4),
        True,
    ),
    "flash-padded": ("flash", None, None, False),  # LBHNC with padding after every page
    "mla": ("mla", lambda L, B, H, N, C: (L, B, N, C), lambda t: t, False),
    "mla-4d": ("mla", lambda L, B, H, N, C: (L, B, 1, N, C), lambda t: t, False),
    "mla-BLNC-cross": ("mla", lambda L, B, H, N, C: (B, L, N, C), lambda t: t.transpose(0, 1), True),
}


def make_cache(
    case: str,
    dtype: torch.dtype,
    *,
    layers: int,
    blocks: int,
    heads: int,
    block_tokens: int,
    head_dim: int,
    fill: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Cache:
    """A cache of random bytes (or ``fill`` bytes); ``head_dim`` is the latent size for MLA."""
    name, physical, to_logical, cross = CASES[case]
    layout = LAYOUTS[name]()
    gen = torch.Generator().manual_seed(seed)
    size = torch.empty((), dtype=dtype).element_size()
    L, B, N = layers, blocks, block_tokens
    H, C = (1, head_dim) if name == "mla" else (heads, 2 * head_dim)
    if physical is None:  # padded pages: each block's [H, N, C] followed by 3 spare elements
        page = H * N * C
        raw = _raw(L * B * (page + 3) * size, fill, gen).to(device)
        full = raw.view(dtype).view(L, B, page + 3)
        per_layer = [full[i, :, :page].unflatten(1, (H, N, C)) for i in range(L)]
        return Cache(layout, per_layer, per_layer, raw)
    shape = physical(L, B, H, N, C)
    raw = _raw(torch.Size(shape).numel() * size, fill, gen).to(device)
    logical = to_logical(raw.view(dtype).view(shape))
    per_layer = list(logical.unbind(0))
    return Cache(layout, logical if cross else per_layer, per_layer, raw)


# Odd sizes everywhere: 3 layers, 11 blocks of 5 tokens, 3 heads of dim 12 (MLA: latent 12).
SHAPE = {"layers": 3, "blocks": 11, "heads": 3, "block_tokens": 5, "head_dim": 12}
COUNT = 4  # blocks per call
EXT = csrc_extension()


def make_chunk(cache: Cache, tokens: int, *, fill: int | None = None, seed: int = 1, **to) -> torch.Tensor:
    first = cache.layers[0]
    shape = cache.layout.chunk_shape(first, len(cache.layers), tokens)
    raw = _raw(torch.Size(shape).numel() * first.element_size(), fill, torch.Generator().manual_seed(seed))
    return raw.view(first.dtype).view(shape).to(**to) if to else raw.view(first.dtype).view(shape)


def table(seed: int = 3) -> torch.Tensor:
    """COUNT distinct blocks in a scrambled order."""
    return torch.randperm(SHAPE["blocks"], generator=torch.Generator().manual_seed(seed))[:COUNT]


def tokens_for(partial: bool) -> int:
    n = SHAPE["block_tokens"]
    return COUNT * n - 2 if partial else COUNT * n


def test_extension_is_built_and_used():
    """CI builds the extension in scripts/install.sh; a silent fallback must not pass for it."""
    if os.environ.get("KVPOOL_BUILD_CSRC") == "0":
        pytest.skip("KVPOOL_BUILD_CSRC=0: installed without the extension")
    assert kvcopy.extension_available(), kvcopy.extension_status()
    cache = make_cache("flash-LBHNC", torch.float16, **SHAPE)
    out = make_chunk(cache, tokens_for(False))
    assert cache.layout.gather_chunks(cache.arg, table(), out) == "csrc"
    assert cache.layout.scatter_chunks(cache.arg, table(), out) == "csrc"


@EXT
@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_gather_is_byte_identical_to_reference(case, dtype, partial):
    cache = make_cache(case, dtype, **SHAPE)
    ids, tokens = table(), tokens_for(partial)
    ref = make_chunk(cache, tokens, fill=0xA5)
    got = make_chunk(cache, tokens, fill=0x5A)
    assert cache.layout.gather_chunks(cache.arg, ids, ref, impl="torch") == "torch"
    assert cache.layout.gather_chunks(cache.arg, ids, got, impl="csrc") == "csrc"
    assert torch.equal(as_bytes(got), as_bytes(ref))
    # and both equal the per-layer copies (test_paged.py checks those against backend semantics)
    per_layer = cache.layout.chunk_view(torch.stack([cache.layout.gather(kv, ids) for kv in cache.layers]))
    assert torch.equal(as_bytes(per_layer)[:, :, :tokens], as_bytes(cache.layout.chunk_view(got)))


@EXT
@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_scatter_is_byte_identical_and_round_trips(case, dtype, partial):
    ids, tokens = table(), tokens_for(partial)
    src = make_chunk(make_cache(case, dtype, **SHAPE), tokens, seed=7)
    dst = {impl: make_cache(case, dtype, **SHAPE, fill=0xC3) for impl in ("torch", "csrc")}
    for impl, cache in dst.items():
        assert cache.layout.scatter_chunks(cache.arg, ids, src, impl=impl) == impl
    # every byte of the cache equal, padding between pages included
    assert torch.equal(dst["torch"].raw, dst["csrc"].raw)
    cache = dst["csrc"]
    back = make_chunk(cache, tokens, fill=0)
    cache.layout.gather_chunks(cache.arg, ids, back, impl="csrc")
    assert torch.equal(as_bytes(back), as_bytes(src))
    # blocks outside the table, and the tokens past the end of a partial last block, untouched
    last_tokens = tokens - (COUNT - 1) * SHAPE["block_tokens"]
    others = [b for b in range(SHAPE["blocks"]) if b not in ids.tolist()]
    for kv in cache.layers:
        view = as_bytes(cache.layout.block_view(kv))
        assert bool((view[others] == 0xC3).all())
        assert bool((view[int(ids[-1]), :, last_tokens:] == 0xC3).all())


@EXT
def test_large_copy_split_over_threads_is_identical():
    """4 layers x 24 blocks x 16 KiB: enough boxes for the extension's parallel loop."""
    shape = {"layers": 4, "blocks": 64, "heads": 4, "block_tokens": 16, "head_dim": 64}
    cache = make_cache("flash-LBNHC", torch.bfloat16, **shape)
    ids = torch.randperm(64, generator=torch.Generator().manual_seed(5))[:24]
    out = {impl: torch.zeros(cache.layout.chunk_shape(cache.layers[0], 4, 24 * 16), dtype=torch.bfloat16)
           for impl in ("torch", "csrc")}  # fmt: skip
    for impl, chunk in out.items():
        cache.layout.gather_chunks(cache.arg, ids, chunk, impl=impl)
    assert torch.equal(as_bytes(out["csrc"]), as_bytes(out["torch"]))
    dst = make_cache("flash-LBNHC", torch.bfloat16, **shape, fill=0)
    dst.layout.scatter_chunks(dst.arg, ids, out["csrc"], impl="csrc")
    assert torch.equal(dst.raw.view(-1, 16 * 4 * 128 * 2)[ids], cache.raw.view(-1, 16 * 4 * 128 * 2)[ids])


@EXT
def test_block_table_as_list_or_any_integer_tensor():
    cache = make_cache("cpu-LBHNC", torch.float32, **SHAPE)
    ids = table()
    outs = []
    for form in (ids.tolist(), ids.to(torch.int32), ids):
        out = make_chunk(cache, tokens_for(False), fill=0)
        cache.layout.gather_chunks(cache.arg, form, out)
        outs.append(out)
    assert all(torch.equal(as_bytes(o), as_bytes(outs[0])) for o in outs)


@EXT
def test_chunk_may_be_a_token_slice_of_a_larger_chunk():
    """The connector loads [lo, hi) of a stored chunk: a strided view, not a new tensor."""
    cache = make_cache("flash-LBHNC", torch.float16, **SHAPE)
    n = SHAPE["block_tokens"]
    whole = make_chunk(cache, 6 * n, seed=9)
    part = whole[:, :, n : 3 * n]
    dst = {impl: make_cache("flash-LBHNC", torch.float16, **SHAPE, fill=0) for impl in ("torch", "csrc")}
    for impl, c in dst.items():
        c.layout.scatter_chunks(c.arg, [7, 2], part, impl=impl)
    assert torch.equal(dst["torch"].raw, dst["csrc"].raw)
    assert torch.equal(as_bytes(dst["csrc"].layout.gather(dst["csrc"].layers[1], torch.tensor([7, 2]))),
                       as_bytes(part[1]))  # fmt: skip


@dataclass
class Bad:
    """A call that must fail: what to change, and the message it must give."""

    match: str
    ids: object = None
    tokens: int | None = None
    chunk: object = None  # function of (cache, tokens) -> chunk
    layers: object = None  # function of cache -> kv_caches argument


N = SHAPE["block_tokens"]
BAD = {
    "id past the end": Bad("block id 11 is out of range", ids=[0, 11, 2, 3]),
    "negative id": Bad("block id -1 is out of range", ids=[0, -1, 2, 3]),
    "too many tokens": Bad("do not fit 4 blocks", tokens=4 * N + 1),
    "too few tokens": Bad("do not fit 4 blocks", tokens=3 * N),
    "no blocks": Bad("do not fit 0 blocks", ids=[], tokens=1),
    "float ids": Bad("integer", ids=torch.tensor([0.0, 1.0, 2.0, 3.0])),
    "chunk of other heads": Bad(
        "does not match", chunk=lambda c, t: torch.zeros(3, 2, t, 2, 12, dtype=c.layers[0].dtype)
    ),
    "chunk of other layers": Bad(
        "does not match", chunk=lambda c, t: torch.zeros(2, 2, t, 3, 12, dtype=c.layers[0].dtype)
    ),
    "chunk of other dtype": Bad("the chunk is torch.float32", chunk=lambda c, t: torch.zeros(3, 2, t, 3, 12)),
    "chunk of other rank": Bad("chunk is", chunk=lambda c, t: torch.zeros(3, t, 72, dtype=c.layers[0].dtype)),
    "layers of other shapes": Bad(
        "layer 2 is", layers=lambda c: [*c.layers[:2], torch.zeros(11, 3, 5, 26, dtype=c.layers[0].dtype)]
    ),
    "not a cache view": Bad("KV cache layer is", layers=lambda c: [kv[0] for kv in c.layers]),
    "strided innermost dim": Bad("innermost dim", layers=lambda c: [kv[..., ::2] for kv in c.layers]),
}


@pytest.mark.parametrize("impl", ["torch", pytest.param("csrc", marks=EXT)])
@pytest.mark.parametrize("op", ["gather", "scatter"])
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_arguments_raise_and_touch_nothing(bad, op, impl):
    spec = BAD[bad]
    cache = make_cache("flash-LBHNC", torch.float16, **SHAPE)
    tokens = spec.tokens if spec.tokens is not None else tokens_for(False)
    chunk = spec.chunk(cache, tokens) if spec.chunk else make_chunk(cache, tokens, seed=4)
    kv = spec.layers(cache) if spec.layers else cache.arg
    ids = spec.ids if spec.ids is not None else table()
    before_cache, before_chunk = cache.raw.clone(), as_bytes(chunk).clone()
    fn = cache.layout.gather_chunks if op == "gather" else cache.layout.scatter_chunks
    with pytest.raises(ValueError, match=spec.match):
        fn(kv, ids, chunk, impl=impl)
    assert torch.equal(cache.raw, before_cache) and torch.equal(as_bytes(chunk), before_chunk)


@pytest.mark.parametrize("impl", ["torch", pytest.param("csrc", marks=EXT)])
def test_scatter_rejects_a_repeated_block(impl):
    cache = make_cache("mla", torch.bfloat16, **SHAPE)
    before = cache.raw.clone()
    with pytest.raises(ValueError, match="appears twice"):
        cache.layout.scatter_chunks(cache.arg, [1, 4, 1, 5], make_chunk(cache, 4 * N), impl=impl)
    assert torch.equal(cache.raw, before)
    # a gather may read a block twice
    cache.layout.gather_chunks(cache.arg, [1, 4, 1, 5], make_chunk(cache, 4 * N), impl=impl)


@EXT
def test_extension_checks_its_own_arguments():
    """Called directly, past kvcopy's checks, the binding still refuses before touching memory."""
    ext = kvcopy._ext
    cache = make_cache("flash-LBHNC", torch.float16, **SHAPE, fill=0)
    layers, pages = cache.layers, as_bytes(cache.layout.block_view(cache.layers[0]))
    chunk = make_chunk(cache, tokens_for(False), seed=6)
    view = as_bytes(chunk)
    ids = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="block id 99 at position 1 is out of range"):
        ext.copy_blocks(layers, pages, torch.tensor([0, 99, 1, 2]), view, False)
    with pytest.raises(ValueError, match="appears twice"):
        ext.copy_blocks(layers, pages, torch.tensor([3, 1, 3, 2]), view, False)
    with pytest.raises(ValueError, match="tokens do not fit"):
        ext.copy_blocks(layers, pages, torch.tensor([0, 1, 2]), view, False)
    with pytest.raises(ValueError, match="layer 1 is"):
        ext.copy_blocks([layers[0], layers[1][:5]], pages, ids, view[:2], False)
    with pytest.raises(ValueError, match="int64 CPU tensor"):
        ext.copy_blocks(layers, pages, ids.to(torch.int32), view, False)
    with pytest.raises(ValueError, match="a view of layer 0"):
        ext.copy_blocks(layers, as_bytes(cache.layout.block_view(layers[1])), ids, view, False)
    # a block view wider than the other layers' storage: refused, not read out of bounds
    wide = torch.zeros(22, 3, 5, 24, dtype=torch.float16)
    small = [wide[:11], torch.zeros(11, 3, 5, 24, dtype=torch.float16)]
    with pytest.raises(ValueError, match="reaches past the storage of layer 1"):
        ext.copy_blocks(small, as_bytes(cache.layout.block_view(wide)), ids, view[:2], True)
    assert int(cache.raw.count_nonzero()) == 0


def test_falls_back_to_torch_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(kvcopy, "_ext", None)
    monkeypatch.setattr(kvcopy, "_ext_error", "not built (test)")
    monkeypatch.setattr(kvcopy, "_logged", set())
    cache = make_cache("cpu-LBHNC", torch.bfloat16, **SHAPE)
    out = make_chunk(cache, tokens_for(True), fill=0)
    with caplog.at_level(logging.INFO, logger="kvpool.connector"):
        assert cache.layout.gather_chunks(cache.arg, table(), out) == "torch"
        assert cache.layout.scatter_chunks(cache.arg, table(), out) == "torch"
    assert [r.getMessage() for r in caplog.records].count(
        "kvpool: KV copy extension unavailable: not built (test); using the torch reference for KV copies"
    ) == 1
    with pytest.raises(RuntimeError, match="not built"):
        cache.layout.gather_chunks(cache.arg, table(), out, impl="csrc")
    with pytest.raises(ValueError, match="impl must be"):
        cache.layout.gather_chunks(cache.arg, table(), out, impl="fast")


def test_package_imports_and_copies_without_the_extension():
    code = (
        "import sys; sys.modules['kvpool.connector._kvcopy'] = None\n"
        "import torch\n"
        "from kvpool.connector import kvcopy\n"
        "from kvpool.connector.paged import FlashLayout\n"
        "kv = [torch.randn(4, 2, 3, 8) for _ in range(2)]\n"
        "out = torch.empty(2, 2, 5, 2, 4)\n"
        "print(FlashLayout().gather_chunks(kv, [3, 1], out), kvcopy.extension_status())\n"
    )
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("torch KV copy extension unavailable: not built")


# ------------------------------------------------------------------ CUDA (skipped without a GPU;
# failed instead under KVPOOL_REQUIRE_CUDA=1, as scripts/gpu-check.sh runs them: tests/conftest.py)
if not torch.cuda.is_available():
    _CUDA_SKIP = pytest.mark.skip(reason="no CUDA GPU on this machine")
elif not (kvcopy.extension_available() and kvcopy._ext.cuda_built()):
    _CUDA_SKIP = pytest.mark.skip(
        reason="the extension was built without its CUDA kernels (needs a CUDA torch and nvcc)"
    )
else:
    _CUDA_SKIP = pytest.mark.skipif(False, reason="a CUDA GPU and the CUDA kernels are here")


def CUDA(test):
    return pytest.mark.cuda(_CUDA_SKIP(test))


@CUDA
@pytest.mark.parametrize("where", ["pinned", "device"])
@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("cpu")])
def test_cuda_gather_scatter_identical_to_reference(case, dtype, partial, where):
    ids, tokens = table(), tokens_for(partial)
    cache = make_cache(case, dtype, **SHAPE, device="cuda")

    def chunk(**kw):
        c = make_chunk(cache, tokens, **kw)
        return c.pin_memory() if where == "pinned" else c.to("cuda")

    ref, got = chunk(fill=1), chunk(fill=2)
    assert cache.layout.gather_chunks(cache.arg, ids, ref, impl="torch") == "torch"
    assert cache.layout.gather_chunks(cache.arg, ids, got, impl="csrc") == "csrc"
    assert torch.equal(as_bytes(got).cpu(), as_bytes(ref).cpu())
    src = chunk(seed=8)
    dst = {impl: make_cache(case, dtype, **SHAPE, fill=0xC3, device="cuda") for impl in ("torch", "csrc")}
    for impl, c in dst.items():
        assert c.layout.scatter_chunks(c.arg, ids, src, impl=impl) == impl
    assert torch.equal(dst["torch"].raw.cpu(), dst["csrc"].raw.cpu())


@CUDA
def test_cuda_non_blocking_copies_are_ordered_on_the_stream():
    """16-byte words (head_dim 64 in bf16), on a side stream, synchronised by the caller."""
    shape = {"layers": 2, "blocks": 16, "heads": 4, "block_tokens": 16, "head_dim": 64}
    cache = make_cache("flash-LBNHC", torch.bfloat16, **shape, device="cuda")
    ids = torch.randperm(16, generator=torch.Generator().manual_seed(2))[:6]
    out = make_chunk(cache, 6 * 16 - 5, fill=0).pin_memory()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        cache.layout.gather_chunks(cache.arg, ids, out, impl="csrc", non_blocking=True)
    stream.synchronize()
    ref = make_chunk(cache, 6 * 16 - 5, fill=0)
    cache.layout.gather_chunks(cache.arg, ids, ref, impl="torch")
    assert torch.equal(as_bytes(out), as_bytes(ref))
    dst = make_cache("flash-LBNHC", torch.bfloat16, **shape, fill=0, device="cuda")
    with torch.cuda.stream(stream):
        dst.layout.scatter_chunks(dst.arg, ids, out, impl="csrc", non_blocking=True)
    stream.synchronize()
    back = make_chunk(cache, 6 * 16 - 5, fill=0)
    dst.layout.gather_chunks(dst.arg, ids, back, impl="torch")
    assert torch.equal(as_bytes(back), as_bytes(ref))


@CUDA
def test_cuda_pageable_chunk_falls_back_or_refuses():
    cache = make_cache("flash-LBHNC", torch.float16, **SHAPE, device="cuda")
    out = make_chunk(cache, tokens_for(False), fill=0)  # pageable host memory
    assert cache.layout.gather_chunks(cache.arg, table(), out) == "torch"
    with pytest.raises(RuntimeError, match="pinned"):
        cache.layout.gather_chunks(cache.arg, table(), out, impl="csrc")
