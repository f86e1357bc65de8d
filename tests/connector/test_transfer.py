"""The worker's data path (loader.py, saver.py) on real CPU paged caches and real pools, no engine.

Chunks are saved out of one set of blocks and loaded into another; the bytes must be those of the
torch reference (``PagedLayout.gather``). The pools are real: the embedded pool (a loopback cache
node in this process) and the same node reached as a remote pool, whose client receives into its
pooled receive buffers.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from kvpool.connector import chunkfmt, metrics
from kvpool.connector.backend import SafePool, open_pool
from kvpool.connector.loader import Loader, LoadJob
from kvpool.connector.paged import LAYOUTS
from kvpool.connector.pools import RemotePool
from kvpool.connector.saver import Saver
from kvpool.connector.transfer import PagedCache

L, H, D, N, C = 3, 2, 16, 8, 32  # layers, kv heads, head dim, block tokens, chunk tokens
BLOCKS = 64
FP = b"f" * 32


def _cache(seed: int = 0) -> PagedCache:
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn(BLOCKS, H, N, 2 * D, generator=g).to(torch.bfloat16) for _ in range(L)]
    return PagedCache(LAYOUTS["cpu"](), layers, block_size=N, ratio=1, chunk_shape=(L, 2, C, H, D))


def _spec(key: bytes) -> chunkfmt.ChunkSpec:
    return chunkfmt.ChunkSpec(key, FP, "bfloat16", (L, 2, C, H, D), C)


def _reference(cache: PagedCache, blocks: list[int]) -> bytes:
    """A chunk's payload by the torch reference, one layer at a time."""
    ids = torch.tensor(blocks)
    chunk = torch.stack([cache.layout.gather(kv, ids) for kv in cache.layers])
    return chunk.contiguous().view(torch.uint8).numpy().tobytes()


def _blocks_of(chunk: int, base: int) -> list[int]:
    per = C // N
    return list(range(base + chunk * per, base + (chunk + 1) * per))


def _save(cache: PagedCache, pool: SafePool, keys: list[bytes], base: int, budget: int = 16 << 20) -> Saver:
    saver = Saver(cache, pool, budget)
    saver.save("req", [(_spec(k), _blocks_of(i, base)) for i, k in enumerate(keys)])
    saver.flush()
    return saver


def _job(keys: list[bytes], blocks: list[int], start: int, end: int, first: int = 0, **kw) -> LoadJob:
    return LoadJob("req", keys, first, blocks, start, end, prompt_tokens=end + 5, **kw)


def test_saved_chunks_are_the_reference_bytes_and_load_back_exactly(embedded):
    src = _cache(1)
    keys = [bytes([i]) * 32 for i in range(4)]
    saver = _save(src, embedded, keys, base=0)
    assert saver.copied("req")
    stored = embedded.get_many(keys)
    for i, key in enumerate(keys):
        assert bytes(chunkfmt.decode(stored[i], _spec(key))) == _reference(src, _blocks_of(i, 0))
    dst = _cache(2)
    before = [t.clone() for t in dst.layers]
    blocks = list(range(20, 20 + 4 * C // N))
    result = Loader(dst, embedded, _spec, C).run(_job(keys, blocks, 0, 4 * C))
    assert (result.ok_chunks, result.ok_tokens, result.failed_chunk) == (4, 4 * C, None)
    for i in range(4):
        assert _reference(dst, blocks[i * 4 : (i + 1) * 4]) == _reference(src, _blocks_of(i, 0))
    untouched = [b for b in range(BLOCKS) if b not in blocks]
    for a, b in zip(before, dst.layers, strict=True):
        assert torch.equal(a[untouched].view(torch.int16), b[untouched].view(torch.int16))
    saver.close()


def test_saved_chunks_reach_the_embedded_pools_disk_and_survive_a_restart(tmp_path):
    """The saver hands out views of its buffers and reuses them once the write returns; the
    disk tier writes later, from its own thread, so it must have been given bytes it owns."""
    src = _cache(17)
    keys = [bytes([240 + i]) * 32 for i in range(3)]
    opened = dict(memory_bytes=64 << 20, disk_dir=str(tmp_path), disk_bytes=64 << 20, timeout_s=2)
    pool = open_pool(None, engine_id=uuid.uuid4().hex, **opened)
    _save(src, pool, keys, base=0).close()
    pool.close()  # flushes the disk tier's queue
    again = open_pool(None, engine_id=uuid.uuid4().hex, **opened)
    try:
        stored = again.get_many(keys)
        for i, key in enumerate(keys):
            assert stored[i] is not None, f"chunk {i} did not reach the disk"
            assert bytes(chunkfmt.decode(stored[i], _spec(key))) == _reference(src, _blocks_of(i, 0))
    finally:
        again.close()


def test_a_remote_pool_loads_through_pooled_receive_buffers_two_windows_at_most(embedded):
    """One chunk per window: the client's receive buffers never hold more than two windows, and
    every buffer is back in its pool once the load is done."""
    src, dst = _cache(3), _cache(4)
    keys = [bytes([50 + i]) * 32 for i in range(6)]
    _save(src, embedded, keys, base=0).close()
    remote = RemotePool(embedded.pool.url, 2)
    held_before_receive: list[int] = []

    class Watch(SafePool):
        def get_many_into(self, k):
            held_before_receive.append(remote._client.buffers.used_bytes)
            return super().get_many_into(k)

    pool = Watch(remote)
    loader = Loader(dst, pool, _spec, C, window_bytes=1)
    blocks = list(range(30, 30 + 6 * C // N))
    # starts inside chunk 0 (vLLM had its first block) and ends inside chunk 5, on a block boundary
    result = loader.run(_job(keys, blocks[1:-2], N, 6 * C - 2 * N))
    assert (result.ok_chunks, result.ok_tokens, result.failed_chunk) == (6, 6 * C - 3 * N, None)
    one = chunkfmt.HEADER_SIZE + _spec(keys[0]).payload_size
    assert len(held_before_receive) == 6 and max(held_before_receive) <= -(-one // 4096) * 4096
    assert remote._client.buffers.used_bytes == 0
    assert _reference(dst, blocks[1:4]) == _reference(src, _blocks_of(0, 0)[1:])
    for i in range(1, 5):
        assert _reference(dst, blocks[i * 4 : (i + 1) * 4]) == _reference(src, _blocks_of(i, 0))
    assert _reference(dst, blocks[20:22]) == _reference(src, _blocks_of(5, 0)[:2])
    pool.close()


def test_a_missing_chunk_ends_the_load_there_and_only_the_chunks_before_it_are_written(embedded):
    src, dst = _cache(5), _cache(6)
    keys = [bytes([90 + i]) * 32 for i in range(4)]
    _save(src, embedded, keys, base=0).close()
    embedded.delete([keys[2]])
    before = [t.clone() for t in dst.layers]
    blocks = list(range(40, 56))
    result = Loader(dst, embedded, _spec, C).run(_job(keys, blocks, 0, 4 * C))
    outcome = (result.ok_chunks, result.ok_tokens, result.failed_chunk, result.failed_from_token)
    assert outcome == (2, 64, 2, 64)
    assert _reference(dst, blocks[4:8]) == _reference(src, _blocks_of(1, 0))
    for a, b in zip(before, dst.layers, strict=True):  # chunk 3 was there, but is not written
        assert torch.equal(a[blocks[8:]].view(torch.int16), b[blocks[8:]].view(torch.int16))


def test_a_corrupt_chunk_and_a_chunk_of_another_format_are_deleted(embedded):
    """Both are misses that every later lookup would find again: deleted, so that the chunk the
    engine recomputes replaces them."""
    src, dst = _cache(7), _cache(8)
    keys = [bytes([120 + i]) * 32 for i in range(2)]
    _save(src, embedded, keys, base=0).close()
    value = bytearray(embedded.get_many([keys[0]])[0])
    value[chunkfmt.HEADER_SIZE + 7] ^= 1
    embedded.put_many([(keys[0], bytes(value))])
    corrupt = metrics.STATS.totals["corrupt_chunks"]
    result = Loader(dst, embedded, _spec, C).run(_job(keys, list(range(8)), 0, 2 * C))
    assert result.failed_chunk == 0 and metrics.STATS.totals["corrupt_chunks"] == corrupt + 1
    assert embedded.get_many([keys[0]]) == [None]  # deleted
    old = b"KVPC" + (1).to_bytes(2, "little") + bytes(200)
    embedded.put_many([(keys[1], old)])
    result = Loader(dst, embedded, _spec, C).run(_job(keys[1:], list(range(4)), C, 2 * C, first=1))
    assert result.failed_chunk == 1 and result.ok_tokens == 0
    assert embedded.get_many([keys[1]]) == [None]  # deleted too


def test_a_copy_that_fails_is_a_miss_from_that_chunk_never_an_error(embedded):
    src, dst = _cache(9), _cache(10)
    keys = [bytes([140 + i]) * 32 for i in range(3)]
    _save(src, embedded, keys, base=0).close()
    blocks = [*range(8), BLOCKS + 5, 9, 10, 11]  # chunk 2 points past the cache
    result = Loader(dst, embedded, _spec, C, window_bytes=1).run(_job(keys, blocks, 0, 3 * C))
    assert (result.ok_chunks, result.failed_chunk) == (2, 2)


def test_background_loads_report_through_take_finished_and_release_their_lease(embedded):
    src, dst = _cache(11), _cache(12)
    keys = [bytes([160 + i]) * 32 for i in range(3)]
    _save(src, embedded, keys, base=0).close()
    store = embedded.pool._store
    found, lease = embedded.lease_prefix(keys, 10_000)
    assert found == 3 and store.stats()["pinned_bytes"] > 0
    loader = Loader(dst, embedded, _spec, C)
    blocks = list(range(12))
    loader.submit(_job(keys, blocks, 0, 3 * C, lease_id=lease, lease_keys=keys))
    done = []
    for _ in range(200):
        done += loader.take_finished(0.05)
        if done:
            break
    assert [r.ok_chunks for r in done] == [3] and loader.pending == 0
    assert store.stats()["pinned_bytes"] == 0
    for i in range(3):
        assert _reference(dst, blocks[i * 4 : (i + 1) * 4]) == _reference(src, _blocks_of(i, 0))
    loader.close()


def test_saves_are_bounded_by_their_buffers_and_dropped_past_them(embedded):
    src = _cache(13)
    keys = [bytes([180 + i]) * 32 for i in range(3)]
    one = -(-_spec(keys[0]).encoded_size // 4096) * 4096
    dropped = metrics.STATS.totals["errors"]
    saver = Saver(src, embedded, budget=2 * one)
    taken = saver.save("req", [(_spec(k), _blocks_of(i, 0)) for i, k in enumerate(keys)])
    saver.flush()
    assert taken == 2 and metrics.STATS.totals["errors"] == dropped + 1
    assert [v is not None for v in embedded.get_many(keys)] == [True, True, False]
    saver.close()


def test_a_pool_that_is_down_is_a_miss_for_loads_and_a_dropped_save():
    dst = _cache(14)
    pool = open_pool("grpc://127.0.0.1:9", memory_bytes=0, disk_dir=None, disk_bytes=0, timeout_s=0.2)
    keys = [bytes([200 + i]) * 32 for i in range(2)]
    result = Loader(dst, pool, _spec, C).run(_job(keys, list(range(8)), 0, 2 * C))
    assert result.failed_chunk == 0 and result.ok_tokens == 0
    saver = Saver(dst, pool, 16 << 20)
    assert saver.save("req", [(_spec(keys[0]), _blocks_of(0, 0))]) == 1  # copied out, then not written
    saver.close()


def test_only_loads_within_two_windows_are_held_whole_for_layer_by_layer_copies():
    """``prepare`` holds every chunk until the last layer is copied; longer loads go window by
    window (``run``), so what a step's loads hold stays bounded whatever the prompt length."""
    loader = Loader(_cache(7), SafePool(None), _spec, C, window_bytes=1)  # one chunk per window
    keys = [bytes([90 + i]) * 32 for i in range(3)]
    assert loader.fits_prepare([_job(keys[:2], [], 0, 2 * C)])
    assert loader.fits_prepare([_job(keys[:1], [], 0, C), _job(keys[1:2], [], 0, C)])
    assert not loader.fits_prepare([_job(keys, [], 0, 3 * C)])
    assert not loader.fits_prepare([_job(keys[:2], [], 0, 2 * C), _job(keys[2:], [], 0, C)])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_on_a_gpu_a_long_load_and_its_saves_hold_no_device_memory_beyond_the_cache(embedded):
    """Chunks go between pinned host buffers and the paged cache on the device: loading and saving
    16 chunks, in the background on side streams, must not grow GPU memory by even one chunk
    (the copy kernels read and write the pinned buffers; the torch reference moves one layer)."""
    device = torch.device("cuda")
    src, dst = _cache(15), _cache(16)
    src = PagedCache(src.layout, [t.to(device) for t in src.layers], N, 1, src.chunk_shape)
    dst = PagedCache(dst.layout, [t.to(device) for t in dst.layers], N, 1, dst.chunk_shape)
    keys = [bytes([220 + i]) * 32 for i in range(16)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    saver = Saver(src, embedded, 64 << 20)
    blocks = [list(range(i * 4, (i + 1) * 4)) for i in range(16)]
    assert saver.save("req", [(_spec(k), blocks[i]) for i, k in enumerate(keys)]) == 16
    saver.flush()
    assert saver.copied("req")
    loader = Loader(dst, embedded, _spec, C, window_bytes=1)
    loader.submit(_job(keys, list(range(64)), 0, 16 * C))
    done = []
    for _ in range(400):
        done += loader.take_finished(0.05)
        if done:
            break
    assert [r.ok_chunks for r in done] == [16]
    torch.cuda.synchronize()
    one_chunk = _spec(keys[0]).payload_size
    assert torch.cuda.max_memory_allocated() - base < one_chunk
    for s, d in zip(src.layers, dst.layers, strict=True):
        assert torch.equal(s[:64].view(torch.int16), d[:64].view(torch.int16))
    loader.close()
    saver.close()
