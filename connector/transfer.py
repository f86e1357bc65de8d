"""Worker side: what loads (loader.py) and saves (saver.py) share — the registered paged cache,
the device seams of their helper threads, and how a device error is reported.

Any failure — a missing, late or corrupt chunk, a pool error, a device error — ends the load at
that chunk: the chunks before it are in place, the rest are reported failed and vLLM recomputes
them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import metrics
from .paged import PagedLayout, kernel_block_ids

log = logging.getLogger(__name__)

# Values of the embedded pool are read-only views; the copies only ever read them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


@dataclass(frozen=True)
class PagedCache:
    """One worker's registered paged KV cache, as the copy kernels take it."""

    layout: PagedLayout
    layers: list[torch.Tensor]  # per-layer caches, in model layer order
    block_size: int  # tokens per scheduler block
    ratio: int  # kernel blocks per scheduler block
    chunk_shape: tuple[int, ...]  # [layers, 2, chunk tokens, kv heads, head dim]

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def kernel_ids(self, block_ids: Sequence[int]) -> list[int]:
        return kernel_block_ids(list(block_ids), self.ratio)

    def chunk_tensor(self, payload) -> torch.Tensor:
        """A chunk's payload bytes as its ``[layers, 2, tokens, heads, dim]`` tensor (no copy)."""
        return torch.frombuffer(payload, dtype=self.dtype).view(self.chunk_shape)


def on_stream(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def worker_device(device: torch.device) -> torch.device:
    """``device`` with its index resolved in the calling (worker) thread: ``cuda`` alone means that
    thread's current device, which another thread would not know."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def bind_device(device: torch.device) -> None:
    """Select the worker's CUDA device in a helper thread before its first CUDA call (nothing on
    the CPU). A new thread starts on device 0: without this, the loader, saver and verify threads of
    a TP rank >= 1 would open a CUDA context on GPU 0 (and their events, pinned registrations and
    kernel launches would go there)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def release_all(held: list) -> None:
    for h in held:
        h.release()


def device_error(exc: BaseException) -> None:
    metrics.ERRORS.labels(kind=f"device:{type(exc).__name__}").inc()
    log.warning("kvpool: KV copy failed on the device (%s); recomputing", exc)
