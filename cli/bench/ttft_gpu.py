"""The GPU figure of `kvpool bench ttft` (DESIGN.md §8), in plain PyTorch: no vLLM needed.

A Llama-3-8B-shaped decoder (ttft_gpu_model.py: 32 layers, 8 KV heads, head dim 128, bf16,
random weights, SDPA with its own grouped-query support) and a prompt of exactly the length asked
for. Cache off (the baseline): the whole prompt's prefill, its KV written into a paged cache as
vLLM keeps it, up to the first token's logits. Warm: the prompt's whole chunks were stored
beforehand in a real kvpool node (`kvpool up`, a separate process) by the connector's ``Saver``;
the first token then costs what the connector does for a request (the chunk keys of the prompt,
a leased lookup ``lease_prefix``, the ``Loader`` fetching each chunk over the data channel into
the client's receive buffers (pinned where CUDA is), verifying it and scattering all layers into
the paged cache) plus the prefill of the rest of the prompt over the loaded KV: the partial last
chunk, or the last block when the prompt is whole chunks (vLLM leaves at least one prompt token to
compute; the load stops at a block boundary before it, as the connector's scheduler does).

    ratio_gpu_ttft_N = baseline_gpu_prefill_ms_N / (gpu_load_ms_N + gpu_decode_ms_N)

``gpu_load_ms`` is keys + lookup + fetch + verify + scatter; ``gpu_decode_ms`` the compute after
it (``gpu_computed_tokens`` tokens up to the first token's logits). ``gpu_outputs_identical``: the
warm path's logits equal, bit for bit, those of the same computation over the KV the prefill
wrote. ``baseline_h2d_gbps``: a plain pinned host→device copy of the loaded bytes, the bound for
the load. Runs on the CPU too (small shapes, for tests), where the figures mean nothing.

What this is not: the baseline is this eager PyTorch model, not vLLM's engine with its CUDA
graphs and FlashAttention kernels (that needs vLLM's CUDA wheel: `kvpool bench ttft` without
``--gpu only`` measures the engine where it runs).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from .ttft_gpu_model import BLOCK, LLAMA3_8B, Model, PagedKV, Shape

CHUNK = 256  # tokens per chunk, the connector's default
LEASE_MS = 30_000  # the lookup's lease: long enough for the load that follows
__all__ = ["BLOCK", "CHUNK", "LLAMA3_8B", "Model", "PagedKV", "Shape", "measure_length", "run"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return 1000 * (time.perf_counter() - t0), out


def _fingerprint(model: Model):
    from kvpool.connector.keys import ModelFingerprint

    s = model.s
    return ModelFingerprint(
        model="bench-ttft-gpu", revision="", kv_dtype=str(model.dtype).removeprefix("torch."),
        kv_layout="flash", num_layers=s.layers, num_kv_heads=s.kv_heads, head_dim=s.head_dim,
        chunk_size=CHUNK, weights=f"random:{s}", device_capability=str(model.device),
    )  # fmt: skip


def chunk_bytes(shape: Shape, dtype: torch.dtype = torch.bfloat16) -> int:
    """Stored bytes of one chunk (chunkfmt header + payload), page-rounded as the pools keep it."""
    from kvpool.connector import chunkfmt

    spec = chunkfmt.ChunkSpec(
        b"\0" * 32, b"\0" * 32, str(dtype).removeprefix("torch."),
        (shape.layers, 2, CHUNK, shape.kv_heads, shape.head_dim), CHUNK,
    )  # fmt: skip
    return -(-spec.encoded_size // 4096) * 4096


@contextlib.contextmanager
def node_pool(nbytes: int) -> Iterator[object]:
    """A `kvpool up` node with room for ``nbytes`` of chunks, reached as the connector reaches
    the pool at KVPOOL_URL (``SafePool`` over ``RemotePool``: the kvpool client)."""
    from kvpool.cli.devtools.local_servers import kvpool_up
    from kvpool.connector.backend import SafePool
    from kvpool.connector.pools import RemotePool

    memory = f"{-(-nbytes // 2**20) + 256}MiB"
    with kvpool_up("--memory", memory) as (_, url):
        pool = SafePool(RemotePool(url, timeout=120.0))
        try:
            yield pool
        finally:
            pool.close()


def measure_length(
    model: Model,
    tokens: int,
    repeats: int,
    progress: Callable[[str], None] = print,
    pool=None,
) -> dict[str, float | bool]:
    """Cache off vs warm pool for a prompt of ``tokens`` tokens; every time a median. ``pool``:
    a ``SafePool`` with room for the prompt's chunks (None: a node started for this call)."""
    if pool is None:
        with node_pool(tokens // CHUNK * chunk_bytes(model.s, model.dtype)) as own:
            return measure_length(model, tokens, repeats, progress, own)
    from kvpool.connector import chunkfmt
    from kvpool.connector.keys import chunk_keys
    from kvpool.connector.loader import Loader, LoadJob
    from kvpool.connector.paged import LAYOUTS
    from kvpool.connector.saver import Saver
    from kvpool.connector.transfer import PagedCache

    s, device = model.s, model.device
    ids = torch.randint(0, s.vocab, (tokens,), generator=torch.Generator().manual_seed(tokens)).to(device)
    token_list = ids.tolist()
    fp = _fingerprint(model)
    keys = chunk_keys(fp, token_list)  # the prompt's whole chunks: what a producer stored
    cached = min(len(keys) * CHUNK, (tokens - 1) // BLOCK * BLOCK)  # what a hit loads
    kv = PagedKV(s, tokens, device, model.dtype)
    # the baseline: the whole prompt's prefill up to the first token's logits, cache off
    prefill = []
    for _ in range(repeats + 1):  # the first one warms up kernels and the allocator
        ms, first = _timed(device, lambda: model.forward(ids, 0, kv))
        prefill.append(ms)
    progress(f"{tokens} tokens: prefill {statistics.median(prefill[1:]):.1f} ms")

    layout = LAYOUTS["flash"]()
    shape = (s.layers, 2, CHUNK, s.kv_heads, s.head_dim)
    cache = PagedCache(layout, kv.layers, block_size=BLOCK, ratio=1, chunk_shape=shape)
    dtype = str(model.dtype).removeprefix("torch.")

    def spec(key: bytes) -> chunkfmt.ChunkSpec:
        return chunkfmt.ChunkSpec(key, fp.digest, dtype, shape, CHUNK)

    per = CHUNK // BLOCK
    if keys:  # a producer's save of the prefill's chunks into the node (not timed)
        saver = Saver(cache, pool, budget=len(keys) * chunk_bytes(s, model.dtype) + (1 << 20))
        taken = saver.save(
            "bench", [(spec(k), kv.block_ids[i * per : (i + 1) * per]) for i, k in enumerate(keys)]
        )
        saver.close(timeout=600)
        stored = pool.prefix_hits(keys)
        if taken != len(keys) or stored != len(keys):
            raise RuntimeError(
                f"{stored} of {len(keys)} chunks stored in the pool ({taken} taken by the saver)"
            )
    # the same computation as the warm path's, over the KV the prefill wrote: the reference
    reference = model.forward(ids[cached:], cached, kv)
    loader = Loader(cache, pool, spec, CHUNK)
    timings: dict[str, list[float]] = {"lookup": [], "load": [], "decode": []}
    identical = True

    def lookup() -> tuple[list[bytes], int, int]:
        found = chunk_keys(fp, token_list)  # the scheduler hashes the prompt
        count, lease = pool.lease_prefix(found, LEASE_MS)
        return found, count, lease

    for _ in range(repeats + 1):
        kv.clear()
        _sync(device)
        t0 = time.perf_counter()
        found, count, lease = lookup()
        t1 = time.perf_counter()
        hit = min(count * CHUNK, (tokens - 1) // BLOCK * BLOCK)
        if hit != cached:
            raise RuntimeError(f"the lookup found {count} of {len(keys)} chunks")
        if hit:
            n = -(-hit // CHUNK)
            job = LoadJob("bench", found[:n], 0, kv.block_ids, 0, hit, tokens, lease, found[:count])
            result = loader.run(job)
            if result.ok_tokens != hit:
                raise RuntimeError(f"the load moved {result.ok_tokens} of {hit} tokens")
        _sync(device)
        t2 = time.perf_counter()
        ms, logits = _timed(device, lambda h=hit: model.forward(ids[h:], h, kv))
        timings["lookup"].append(1000 * (t1 - t0))
        timings["load"].append(1000 * (t2 - t0))
        timings["decode"].append(ms)
        identical &= torch.equal(logits, reference)
    loader.close()
    moved = cached * s.layers * 2 * s.kv_heads * s.head_dim * model.dtype.itemsize
    h2d = _h2d_gbps(moved, device, repeats) if moved else math.nan
    load, decode = timings["load"][1:], timings["decode"][1:]
    figures: dict[str, float | bool] = {
        f"gpu_prompt_tokens_{tokens}": tokens,
        f"gpu_cached_tokens_{tokens}": cached,
        f"gpu_computed_tokens_{tokens}": tokens - cached,
        f"gpu_loaded_bytes_{tokens}": moved,
        f"baseline_gpu_prefill_ms_{tokens}": statistics.median(prefill[1:]),
        f"gpu_lookup_ms_{tokens}": statistics.median(timings["lookup"][1:]),
        f"gpu_load_ms_{tokens}": statistics.median(load),
        f"gpu_decode_ms_{tokens}": statistics.median(decode),
        f"gpu_load_gbps_{tokens}": moved / statistics.median(load) / 1e6,
        f"baseline_h2d_gbps_{tokens}": h2d,
    }
    figures[f"gpu_ttft_ms_{tokens}"] = figures[f"gpu_load_ms_{tokens}"] + figures[f"gpu_decode_ms_{tokens}"]
    figures[f"ratio_gpu_ttft_{tokens}"] = (
        figures[f"baseline_gpu_prefill_ms_{tokens}"] / figures[f"gpu_ttft_ms_{tokens}"]
    )
    ttfts = [a + b for a, b in zip(load, decode, strict=True)]
    figures[f"spread_gpu_ttft_ms_{tokens}"] = [round(min(ttfts), 3), round(max(ttfts), 3)]
    figures[f"gpu_outputs_identical_{tokens}"] = identical
    # informative: greedy first token of the warm path vs the cache-off prefill (other kernels)
    figures[f"gpu_first_token_same_{tokens}"] = bool(first.argmax() == reference.argmax())
    progress(
        f"{tokens} tokens ({cached} from the pool): load {figures[f'gpu_load_ms_{tokens}']:.1f} ms + "
        f"compute {figures[f'gpu_decode_ms_{tokens}']:.1f} ms: {figures[f'ratio_gpu_ttft_{tokens}']:.2f}x"
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
    out["gpu_baseline"] = "eager PyTorch prefill of the whole prompt (SDPA, enable_gqa), not vLLM's engine"
    out["gpu_warm_path"] = "keys + leased lookup + Loader fetching from a kvpool up node + the rest's prefill"
    room = sum(n // CHUNK for n in lengths) * chunk_bytes(shape)
    with node_pool(room) as pool:
        for tokens in lengths:
            out.update(measure_length(model, tokens, repeats, progress, pool))
    out["gpu_attention"] = model.attention
    return out
