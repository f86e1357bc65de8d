"""The GPU figure of `kvpool bench ttft` (DESIGN.md §8), in plain PyTorch: no vLLM needed.

A Llama-3-8B-shaped decoder (32 layers, hidden 4096, 32 query heads, 8 KV heads, head dim 128,
SwiGLU 14336, bf16, random weights, PyTorch SDPA) computes a prompt's prefill — the time to the
first token with the cache off, KV written into a paged cache as vLLM keeps it (FLASH_ATTN's
``[blocks, heads, block tokens, 2·head dim]`` view, NHD pages). With a warm cache, the same
prompt's KV sits in host memory as kvpool chunks (chunkfmt values in pinned, page-aligned buffers,
written by the connector's ``Saver``); the first token then costs the connector's load
(``loader.Loader``: verify every chunk, scatter all layers per chunk into the paged cache with
the copy kernel reading the pinned buffers) plus one decode step over the loaded KV.

    ratio_gpu_ttft_N = baseline_gpu_prefill_ms_N / (gpu_load_ms_N + gpu_decode_ms_N)

``gpu_outputs_identical``: the decode step's logits over the loaded KV equal, bit for bit, those
over the KV the prefill wrote. ``baseline_h2d_gbps``: a plain pinned host→device copy of the same
bytes, the bound for the load. Runs on the CPU too (small shapes, for tests), where the figures
mean nothing.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK = 256  # tokens per chunk, the connector's default
BLOCK = 16  # tokens per block, vLLM's default on GPUs
FP = b"bench-ttft-gpu".ljust(32, b"\0")


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

    def _attend(self, q, k, v, causal: bool) -> torch.Tensor:
        group = self.s.heads // self.s.kv_heads
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=causal
        )
        return out[0].transpose(0, 1)

    def prefill(self, ids: torch.Tensor, write_kv: Callable[[int, torch.Tensor, torch.Tensor], None]):
        """Logits of the last prompt token; each layer's K and V go to ``write_kv``."""
        positions = torch.arange(ids.numel(), device=self.device)
        h = self.embed[ids]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, positions)
            write_kv(i, k, v)
            h = self._finish_layer(layer, h, self._attend(q, k, v, causal=True))
        return self._norm(h[-1:]) @ self.head.T

    def decode(self, token: torch.Tensor, position: int, read_kv: Callable[[int], tuple]) -> torch.Tensor:
        """Logits after one more token, attending to the ``position`` tokens of ``read_kv``."""
        positions = torch.tensor([position], device=self.device)
        h = self.embed[token]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, h, positions)
            past_k, past_v = read_kv(i)
            attn = self._attend(q, torch.cat([past_k, k]), torch.cat([past_v, v]), causal=False)
            h = self._finish_layer(layer, h, attn)
        return self._norm(h) @ self.head.T


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

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._pages(layer)[self._slots] = torch.cat([k, v], -1)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._pages(layer)[self._slots]
        return kv[..., : self.s.head_dim], kv[..., self.s.head_dim :]

    def clear(self) -> None:
        for t in self.layers:
            t.zero_()


class HostChunks:
    """The prompt's chunks as kvpool keeps them in host memory: chunkfmt values in pinned,
    page-aligned buffers, served to the connector's loader as views (no copy)."""

    name = "host memory"

    def __init__(self, total_bytes: int) -> None:
        from kvpool.cachenode.client.buffers import BufferPool

        self.buffers = BufferPool(total_bytes + (1 << 20))
        self.values: dict[bytes, object] = {}

    def get_many_into(self, keys: Sequence[bytes]):
        from kvpool.connector.pools import Borrowed

        return [Borrowed(self.values[k].view) if k in self.values else None for k in keys]

    def put_many(self, items) -> None:
        for key, view in items:
            buf = self.buffers.acquire(len(view))
            buf.view[:] = view
            self.values[key] = buf

    def release(self, lease_id, keys) -> None:
        pass

    def delete(self, keys) -> None:
        pass

    def close(self) -> None:
        for buf in self.values.values():
            buf.release()
        self.buffers.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0), out


def measure_length(
    model: Model, tokens: int, repeats: int, progress: Callable[[str], None] = print
) -> dict[str, float | bool]:
    """Prefill vs (load + one decode step) for one prompt length; every figure a median."""
    from kvpool.connector import chunkfmt
    from kvpool.connector.backend import SafePool
    from kvpool.connector.loader import Loader, LoadJob
    from kvpool.connector.paged import LAYOUTS
    from kvpool.connector.saver import Saver
    from kvpool.connector.transfer import PagedCache

    s, device = model.s, model.device
    chunks = tokens // CHUNK
    n = chunks * CHUNK  # the cached part: whole chunks
    ids = torch.randint(0, s.vocab, (n + 1,), generator=torch.Generator().manual_seed(tokens)).to(device)
    kv = PagedKV(s, n, device, model.dtype)
    # the baseline: prefill of the whole prompt, cache off
    prefill = []
    for _ in range(repeats + 1):  # the first one warms up kernels and the allocator
        ms, _ = _timed(device, lambda: model.prefill(ids[:n], kv.write))
        prefill.append(ms)
    progress(f"{tokens} tokens: prefill {statistics.median(prefill[1:]):.1f} ms")
    reference = model.decode(ids[n:], n, kv.read)

    layout = LAYOUTS["flash"]()
    shape = (s.layers, 2, CHUNK, s.kv_heads, s.head_dim)
    cache = PagedCache(layout, kv.layers, block_size=BLOCK, ratio=1, chunk_shape=shape)
    dtype = str(model.dtype).removeprefix("torch.")
    keys = [i.to_bytes(4, "little") * 8 for i in range(chunks)]

    def spec(key: bytes) -> chunkfmt.ChunkSpec:
        return chunkfmt.ChunkSpec(key, FP, dtype, shape, CHUNK)

    per = CHUNK // BLOCK
    host = HostChunks(chunks * -(-spec(keys[0]).encoded_size // 4096) * 4096)
    pool = SafePool(host)
    saver = Saver(cache, pool, budget=host.buffers.capacity)
    saver.save("bench", [(spec(k), kv.block_ids[i * per : (i + 1) * per]) for i, k in enumerate(keys)])
    saver.close()  # the chunks are in host memory now
    moved = chunks * spec(keys[0]).payload_size
    loader = Loader(cache, pool, spec, CHUNK)
    job = LoadJob("bench", keys, 0, kv.block_ids, 0, n, n + 1)
    load, decode, identical = [], [], True
    for _ in range(repeats + 1):
        kv.clear()
        ms, result = _timed(device, lambda: loader.run(job))
        if result.ok_tokens != n:
            raise RuntimeError(f"the load moved {result.ok_tokens} of {n} tokens")
        load.append(ms)
        ms, logits = _timed(device, lambda: model.decode(ids[n:], n, kv.read))
        decode.append(ms)
        identical &= torch.equal(logits, reference)
    loader.close()
    h2d = _h2d_gbps(moved, device, repeats)
    host.close()
    figures = {
        f"baseline_gpu_prefill_ms_{tokens}": statistics.median(prefill[1:]),
        f"gpu_load_ms_{tokens}": statistics.median(load[1:]),
        f"gpu_decode_ms_{tokens}": statistics.median(decode[1:]),
        f"gpu_load_gbps_{tokens}": moved / statistics.median(load[1:]) / 1e6,
        f"baseline_h2d_gbps_{tokens}": h2d,
    }
    figures[f"gpu_ttft_ms_{tokens}"] = figures[f"gpu_load_ms_{tokens}"] + figures[f"gpu_decode_ms_{tokens}"]
    figures[f"ratio_gpu_ttft_{tokens}"] = (
        figures[f"baseline_gpu_prefill_ms_{tokens}"] / figures[f"gpu_ttft_ms_{tokens}"]
    )
    figures[f"spread_gpu_ttft_ms_{tokens}"] = [
        round(min(a + b for a, b in zip(load[1:], decode[1:], strict=True)), 3),
        round(max(a + b for a, b in zip(load[1:], decode[1:], strict=True)), 3),
    ]
    figures[f"gpu_outputs_identical_{tokens}"] = identical
    progress(
        f"{tokens} tokens: load {figures[f'gpu_load_ms_{tokens}']:.1f} ms + decode "
        f"{figures[f'gpu_decode_ms_{tokens}']:.1f} ms: {figures[f'ratio_gpu_ttft_{tokens}']:.2f}x"
    )
    return figures


def _h2d_gbps(nbytes: int, device: torch.device, repeats: int) -> float:
    """A plain pinned host→device copy of ``nbytes``: what the load can at best reach."""
    if device.type != "cuda":
        return math.nan
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        ms, _ = _timed(device, lambda: dst.copy_(src, non_blocking=True))
        times.append(ms)
    return nbytes / statistics.median(times[1:]) / 1e6


def run(
    lengths: Sequence[int],
    repeats: int = 3,
    progress: Callable[[str], None] = print,
    shape: Shape = LLAMA3_8B,
) -> dict[str, object]:
    """Every length on the first CUDA device (the CPU when there is none, for tests)."""
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    model = Model(shape, device)
    out: dict[str, object] = {
        "gpu_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    }
    out["gpu_model"] = (
        f"{shape.layers} layers, {shape.kv_heads} KV heads, head dim {shape.head_dim}, bf16, random weights"
    )
    from kvpool.connector import kvcopy

    out["gpu_kvcopy"] = kvcopy.extension_status()
    for tokens in lengths:
        out.update(measure_length(model, tokens, repeats, progress))
    return out
