"""On two GPUs: a worker on GPU 1 saves and loads through its helper threads and GPU 0 gets no context.

The worker process selects GPU 1 as vLLM does for TP rank 1, puts its paged cache there, saves chunks
(saver thread, pinned buffers) and loads them back in the background (loader thread, verify threads,
pinned staging of the embedded pool's pageable values). Then the CUDA driver is asked whether GPU 0's
primary context was ever made active in this process: it must not be. Needs two GPUs (skipped with
fewer, also under KVPOOL_REQUIRE_CUDA=1 when the machine has one); no GPU has run it yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

WORKER = r"""
import ctypes, json, threading, uuid
import torch
from kvpool.connector import chunkfmt
from kvpool.connector.backend import open_pool
from kvpool.connector.paged import LAYOUTS
from kvpool.connector.loader import Loader, LoadJob
from kvpool.connector.saver import Saver
from kvpool.connector.transfer import PagedCache

libcuda = ctypes.CDLL("libcuda.so.1")


def gpu0_context_active() -> bool:
    assert libcuda.cuInit(0) == 0
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    assert libcuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
    assert libcuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) == 0
    return bool(active.value)


L, H, D, N, C = 4, 4, 64, 16, 256  # 1 MiB chunks: verified on the verify threads
torch.cuda.set_device(1)  # as vLLM's worker of TP rank 1 does, in its main thread
g = torch.Generator().manual_seed(0)
src = [torch.randn(64, H, N, 2 * D, generator=g).to(torch.bfloat16).to("cuda:1") for _ in range(L)]
dst = [torch.zeros_like(t) for t in src]
torch.cuda.synchronize(1)
before = gpu0_context_active()


def cache(layers):
    return PagedCache(LAYOUTS["flash"](), layers, block_size=N, ratio=1, chunk_shape=(L, 2, C, H, D))


def spec(key):
    return chunkfmt.ChunkSpec(key, b"m" * 32, "bfloat16", (L, 2, C, H, D), C)


pool = open_pool(None, memory_bytes=64 << 20, disk_dir=None, disk_bytes=0, timeout_s=5, engine_id=uuid.uuid4().hex)
keys = [bytes([60 + i]) * 32 for i in range(3)]
per = C // N
saver = Saver(cache(src), pool, 16 << 20)
saved = saver.save("req", [(spec(k), list(range(i * per, (i + 1) * per))) for i, k in enumerate(keys)])
saver.flush()
loader = Loader(cache(dst), pool, spec, C)
loader.submit(LoadJob("req", keys, 0, list(range(3 * per)), 0, 3 * C, prompt_tokens=3 * C + 5))
done = []
for _ in range(400):
    done += loader.take_finished(0.05)
    if done:
        break
torch.cuda.synchronize(1)
same = all(torch.equal(s[: 3 * per].view(torch.int16), d[: 3 * per].view(torch.int16)) for s, d in zip(src, dst))
loader.close()
saver.close()
pool.close()
print(json.dumps({"before": before, "after": gpu0_context_active(), "saved": saved,
                  "loaded": [r.ok_chunks for r in done], "same": same}))
"""


@pytest.mark.cuda(gpus=2)
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)
def test_a_worker_on_gpu_1_never_opens_a_context_on_gpu_0():
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # the driver's order, for cuDeviceGet(0)
    done = subprocess.run(
        [sys.executable, "-P", "-c", WORKER], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["before"] is False, "GPU 0 had a context before the connector ran: this check cannot tell"
    assert (out["saved"], out["loaded"], out["same"]) == (3, [3], True), out
    assert out["after"] is False, "a helper thread opened a CUDA context on GPU 0"
