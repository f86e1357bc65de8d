"""Helper threads select the worker's device before they touch CUDA (runs on the CPU).

A thread starts on CUDA device 0, so the loader, saver and verify threads of a TP rank >= 1 would open
a context on GPU 0 unless they select their worker's GPU first. The seam is ``transfer.bind_device``
(the thread entries call it first) and BufferPool's ``device`` (the pinned registration runs under
it); these tests record the device each one gets, on real threads and real pools. The same on two
real GPUs, with the driver asked whether GPU 0 got a context: tests/gpu/test_multi_gpu.py.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from kvpool.cachenode.client import buffers
from kvpool.cachenode.client.buffers import BufferPool
from kvpool.connector import chunkfmt, transfer
from kvpool.connector.loader import PARALLEL_VERIFY_BYTES, Loader, LoadJob
from kvpool.connector.paged import LAYOUTS
from kvpool.connector.saver import Saver
from kvpool.connector.transfer import PagedCache

# chunks of 1 MiB (PARALLEL_VERIFY_BYTES), so that a window of them is verified on the verify threads
L, H, D, N, C = 4, 4, 64, 16, 256
BLOCKS = 64
FP = b"t" * 32


def _cache(seed: int) -> PagedCache:
    g = torch.Generator().manual_seed(seed)
    layers = [torch.randn(BLOCKS, H, N, 2 * D, generator=g).to(torch.bfloat16) for _ in range(L)]
    return PagedCache(LAYOUTS["cpu"](), layers, block_size=N, ratio=1, chunk_shape=(L, 2, C, H, D))


def _spec(key: bytes) -> chunkfmt.ChunkSpec:
    return chunkfmt.ChunkSpec(key, FP, "bfloat16", (L, 2, C, H, D), C)


def test_loader_saver_and_verify_threads_select_the_workers_device_first(monkeypatch, embedded):
    assert _spec(b"k" * 32).payload_size >= PARALLEL_VERIFY_BYTES
    seen: list[tuple[str, torch.device]] = []
    monkeypatch.setattr(transfer, "bind_device", lambda d: seen.append((threading.current_thread().name, d)))
    src, dst = _cache(1), _cache(2)
    keys = [bytes([40 + i]) * 32 for i in range(3)]
    per = C // N
    saver = Saver(src, embedded, 16 << 20)
    assert (
        saver.save("req", [(_spec(k), list(range(i * per, (i + 1) * per))) for i, k in enumerate(keys)]) == 3
    )
    saver.flush()
    loader = Loader(dst, embedded, _spec, C)
    loader.submit(LoadJob("req", keys, 0, list(range(3 * per)), 0, 3 * C, prompt_tokens=3 * C + 5))
    done = []
    for _ in range(200):
        done += loader.take_finished(0.05)
        if done:
            break
    assert [r.ok_chunks for r in done] == [3]  # the threads did their work after selecting
    loader.close()
    saver.close()
    threads = {name.split("_")[0] for name, _ in seen}  # kvpool-verify_0 → kvpool-verify
    assert {"kvpool-load", "kvpool-save", "kvpool-verify"} <= threads, seen
    assert all(device == src.device for _, device in seen), seen
    assert not any(name == threading.current_thread().name for name, _ in seen)  # only helper threads


def test_bind_device_selects_the_given_gpu_and_nothing_on_the_cpu(monkeypatch):
    selected: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: selected.append(torch.device(d).index))
    transfer.bind_device(torch.device("cpu"))
    assert selected == []
    transfer.bind_device(torch.device("cuda", 1))
    assert selected == [1]


def test_worker_device_resolves_the_current_gpu_in_the_worker_thread(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert transfer.worker_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert transfer.worker_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert transfer.worker_device(torch.device("cpu")) == torch.device("cpu")


class _Cudart:
    """Records the device selected (torch.cuda.device, patched below) at each registration."""

    def __init__(self, current: list) -> None:
        self.current = current
        self.calls: list[tuple[str, int | None]] = []

    def cudaHostRegister(self, address, nbytes, flags):
        self.calls.append(("register", self.current[-1]))
        return 0

    def cudaHostUnregister(self, address):
        self.calls.append(("unregister", self.current[-1]))
        return 0


@pytest.mark.parametrize(
    ("device", "default", "expected"), [(None, None, None), (1, None, 1), (None, 2, 2), (1, 2, 1)]
)
def test_buffer_pool_pins_and_unpins_under_the_given_device(monkeypatch, device, default, expected):
    """``device``, else the process's default (the connector's worker sets it), else the thread's."""
    current: list[int | None] = [None]  # None: the thread's own current device, never selected

    @contextlib.contextmanager
    def select(index):
        current.append(index)
        try:
            yield
        finally:
            current.pop()

    cudart = _Cudart(current)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", select)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(buffers, "_default_device", default)
    pool = BufferPool(1 << 20, prefault=False, device=device)
    assert pool.pinned
    pool.close()
    assert cudart.calls == [("register", expected), ("unregister", expected)]


def test_the_connectors_buffer_pools_are_made_for_the_workers_device(monkeypatch, embedded):
    """The Saver's pinned buffers name its cache's device (on the CPU: none, nothing pinned)."""
    made: list[int | None] = []
    real = buffers.BufferPool.__init__

    def init(self, *args, device=None, **kwargs):
        made.append(device)
        real(self, *args, device=device, **kwargs)

    monkeypatch.setattr(buffers.BufferPool, "__init__", init)
    saver = Saver(_cache(3), embedded, 8 << 20)
    saver._device = torch.device("cuda", 1)  # as a worker of TP rank 1 would have it
    saver._acquire(1 << 20)
    saver._buffers.close()
    saver._buffers = None
    assert made == [1]
