"""`kvpool bench copy`: GB/s of chunk <-> paged KV copies beside plain copies of the same bytes.

On the CPU: the compiled extension's all-layers gather (paged -> chunk) and scatter (chunk ->
paged) beside the pure-torch reference and beside a plain copy of the same number of bytes between
two contiguous buffers (torch's `copy_`, a memcpy spread over torch's threads: the fastest plain
way to move them here). On a GPU, also: load (pinned host chunk -> paged cache on the GPU) beside a
plain pinned host->device copy of the same bytes, and save (paged -> pinned host chunk) beside a
plain device->host copy. Every path runs in every run, in an order rotated run by run, so drift in
the machine's speed hits them alike; ratios pair each run's figures and report the median. Each
baseline's destination is cleared before its timed calls and compared with its source after them
(`bytes_verified`: the bytes each baseline was seen to move).

Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import click

from ..options import option

GB = 1e9
DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn")


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _gbps(nbytes: int, fn: Callable[[], object], repeat: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return nbytes * repeat / (time.perf_counter() - start) / GB


class _Setup:
    """A paged cache twice the size of the batch, a scrambled block table, a chunk buffer."""

    def __init__(self, layout_name, dtype, layers, heads, head_dim, block_tokens, tokens, device, pin):
        import torch

        from kvpool.connector.paged import LAYOUTS

        self.layout = LAYOUTS[layout_name]()
        count = -(-tokens // block_tokens)
        blocks = 2 * count
        shape = (
            (blocks, block_tokens, head_dim)
            if layout_name == "mla"
            else (blocks, heads, block_tokens, 2 * head_dim)
        )
        gen = torch.Generator().manual_seed(0)
        size = torch.empty((), dtype=dtype).element_size()
        raw_shape = (*shape[:-1], shape[-1] * size)  # random bytes, seen as `dtype`
        self.caches = [
            torch.randint(0, 120, raw_shape, dtype=torch.uint8, generator=gen).view(dtype).to(device)
            for _ in range(layers)
        ]
        self.ids = torch.randperm(blocks, generator=gen)[:count]
        self.chunk = torch.zeros(self.layout.chunk_shape(self.caches[0], layers, tokens), dtype=dtype)
        if pin:
            self.chunk = self.chunk.pin_memory()
        self.nbytes = self.chunk.numel() * self.chunk.element_size()

    def gather(self, impl: str) -> None:
        self.layout.gather_chunks(self.caches, self.ids, self.chunk, impl=impl, non_blocking=True)

    def scatter(self, impl: str) -> None:
        self.layout.scatter_chunks(self.caches, self.ids, self.chunk, impl=impl, non_blocking=True)

    def check(self) -> None:
        """The extension's bytes equal the reference's, both ways, before anything is timed."""
        import torch

        from kvpool.connector.kvcopy import as_bytes

        self.gather("csrc")
        self.sync()
        ours = as_bytes(self.chunk).clone()
        self.gather("torch")
        self.sync()
        if not torch.equal(ours, as_bytes(self.chunk)):
            raise click.ClickException("the extension's gather differs from the torch reference")
        before = [as_bytes(c).clone() for c in self.caches]
        self.scatter("csrc")  # writes back what was gathered: the cache must come out unchanged
        self.sync()
        if not all(torch.equal(b, as_bytes(c)) for b, c in zip(before, self.caches, strict=True)):
            raise click.ClickException("scatter(gather(x)) != x with the extension")

    def sync(self) -> None:
        import torch

        if self.caches[0].is_cuda:
            torch.cuda.synchronize()


def _rotated(paths: list, shift: int) -> list:
    """`paths` rotated by `shift`: each path leads in turn within a run."""
    shift %= len(paths)
    return paths[shift:] + paths[:shift]


def _timed_paths(paths: list, repeat: int, sync, nbytes: int, shift: int) -> dict[str, float]:
    return {name: _gbps(nbytes, fn, repeat, sync) for name, fn in _rotated(paths, shift)}


def _cpu_run(s: _Setup, repeat: int, shift: int = 0) -> tuple[dict[str, float], int]:
    """GB/s of every CPU path (in an order rotated by `shift`), and the bytes the memcpy baseline
    was seen to move: its destination is cleared first and compared with its source after."""
    import torch

    src = torch.randint(0, 255, (s.nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault its pages in first, as the paged cache's are: the copy is what is timed
    dst.zero_()  # then cleared, so the check after the timed calls shows they moved the bytes
    none = s.sync
    paths = [
        ("gather_gbps", lambda: s.gather("csrc")),
        ("torch_gather_gbps", lambda: s.gather("torch")),
        ("scatter_gbps", lambda: s.scatter("csrc")),
        ("torch_scatter_gbps", lambda: s.scatter("torch")),
        ("baseline_memcpy_gbps", lambda: dst.copy_(src)),
    ]
    figures = _timed_paths(paths, repeat, none, s.nbytes, shift)
    return figures, s.nbytes if torch.equal(dst, src) else 0


def _gpu_run(s: _Setup, repeat: int, host, device, shift: int = 0) -> tuple[dict[str, float], dict[str, int]]:
    """GB/s of every GPU path (loads, then saves, each group rotated by `shift`), and the bytes
    the H2D and D2H baselines were seen to move (destinations cleared first, compared after)."""
    import torch

    host.random_(0, 255)
    device.zero_()
    loads = [
        ("load_gbps", lambda: s.scatter("csrc")),
        ("torch_load_gbps", lambda: s.scatter("torch")),
        ("baseline_h2d_gbps", lambda: device.copy_(host, non_blocking=True)),
    ]
    figures = _timed_paths(loads, repeat, s.sync, s.nbytes, shift)
    s.sync()
    moved = {"baseline_h2d_gbps": s.nbytes if torch.equal(device.cpu(), host) else 0}
    device.random_(0, 255)
    host.zero_()
    saves = [
        ("save_gbps", lambda: s.gather("csrc")),
        ("torch_save_gbps", lambda: s.gather("torch")),
        ("baseline_d2h_gbps", lambda: host.copy_(device, non_blocking=True)),
    ]
    figures.update(_timed_paths(saves, repeat, s.sync, s.nbytes, shift))
    s.sync()
    moved["baseline_d2h_gbps"] = s.nbytes if torch.equal(device.cpu(), host) else 0
    return figures, moved


RATIOS = {
    "ratio_gather_vs_memcpy": ("gather_gbps", "baseline_memcpy_gbps"),
    "ratio_scatter_vs_memcpy": ("scatter_gbps", "baseline_memcpy_gbps"),
    "ratio_gather_vs_torch": ("gather_gbps", "torch_gather_gbps"),
    "ratio_scatter_vs_torch": ("scatter_gbps", "torch_scatter_gbps"),
    "ratio_load_vs_h2d": ("load_gbps", "baseline_h2d_gbps"),
    "ratio_save_vs_d2h": ("save_gbps", "baseline_d2h_gbps"),
    "ratio_load_vs_torch": ("load_gbps", "torch_load_gbps"),
    "ratio_save_vs_torch": ("save_gbps", "torch_save_gbps"),
}


def _gpu_skip_reason() -> str | None:
    import torch

    from kvpool.connector import kvcopy

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if not (kvcopy.extension_available() and kvcopy._ext.cuda_built()):
        return kvcopy.extension_status() + " (no CUDA kernels)"
    return None


@click.command("copy")
@option("--runs", type=click.IntRange(1, 100), default=5, show_default=True, help="Samples per figure.")
@option("--repeat", type=click.IntRange(1, 100), default=3, show_default=True, help="Calls timed per sample.")
@option("--layers", type=click.IntRange(1, 512), default=32, show_default=True)
@option("--kv-heads", type=click.IntRange(1, 256), default=8, show_default=True)
@option(
    "--head-dim", type=click.IntRange(1, 4096), default=128, show_default=True, help="Latent size for mla."
)
@option("--tokens", type=click.IntRange(1, 1 << 20), default=1024, show_default=True, help="Tokens per call.")
@option(
    "--block-tokens",
    type=click.IntRange(0, 4096),
    default=0,
    help="Tokens per paged block; 0 = vLLM's default (128 on the CPU, 16 on GPUs).",
)
@option("--dtype", type=click.Choice(DTYPES), default="bfloat16", show_default=True)
@option(
    "--layout",
    type=click.Choice(["auto", "cpu", "flash", "mla"]),
    default="auto",
    show_default=True,
    help="auto: cpu for the CPU figures, flash for the GPU figures.",
)
@option(
    "--threads",
    type=click.IntRange(0, 1024),
    default=0,
    help="torch threads for every CPU path (the extension, the reference, memcpy); 0 = torch's default.",
)
@click.option("--json", "as_json", is_flag=True, help="End with one JSON line of figures.")
def copy_cmd(
    runs, repeat, layers, kv_heads, head_dim, tokens, block_tokens, dtype, layout, threads, as_json
) -> None:
    """Chunk <-> paged KV copy GB/s: extension vs torch reference vs plain memcpy (and H2D/D2H on a GPU)."""
    import torch

    from kvpool.connector import kvcopy

    if not kvcopy.extension_available():
        raise click.ClickException(kvcopy.extension_status())
    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    result: dict = {
        "runs": runs, "repeat": repeat, "layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
        "tokens": tokens, "dtype": dtype, "threads": torch.get_num_threads(),
    }  # fmt: skip
    samples: dict[str, list[float]] = {}

    cpu_layout = "cpu" if layout == "auto" else layout
    cpu = _Setup(
        cpu_layout, torch_dtype, layers, kv_heads, head_dim, block_tokens or 128, tokens, "cpu", False
    )
    cpu.check()
    result.update(
        cpu_layout=cpu_layout,
        cpu_block_tokens=block_tokens or 128,
        mib_per_call=round(cpu.nbytes / 2**20, 2),
        bytes_per_call=cpu.nbytes,
    )
    gpu_reason = _gpu_skip_reason()
    gpu = host = device = None
    if gpu_reason is None:
        gpu_layout = "flash" if layout == "auto" else layout
        gpu = _Setup(
            gpu_layout, torch_dtype, layers, kv_heads, head_dim, block_tokens or 16, tokens, "cuda", True
        )
        gpu.check()
        host = torch.zeros(gpu.nbytes, dtype=torch.uint8).pin_memory()
        device = torch.zeros(gpu.nbytes, dtype=torch.uint8, device="cuda")
        result.update(
            gpu=torch.cuda.get_device_name(), gpu_layout=gpu_layout, gpu_block_tokens=block_tokens or 16
        )
    else:
        result["gpu"] = f"skipped: {gpu_reason}"
    click.echo(
        f"{cpu.nbytes / 2**20:.1f} MiB per call, {runs} runs of {repeat} calls; gpu: {result['gpu']}",
        err=True,
    )

    verified: dict[str, int] = {}  # baseline -> bytes it was seen to move, over the counted runs
    for run in range(-1, runs):  # run -1 warms threads, pages and caches; not counted
        figures, memcpy_bytes = _cpu_run(cpu, repeat, max(run, 0))
        moved = {"baseline_memcpy_gbps": memcpy_bytes}
        if gpu is not None:
            gpu_figures, gpu_moved = _gpu_run(gpu, repeat, host, device, max(run, 0))
            figures.update(gpu_figures)
            moved.update(gpu_moved)
        if run < 0:
            continue
        for key, nbytes in moved.items():
            verified[key] = verified.get(key, 0) + nbytes
        for key, value in figures.items():
            samples.setdefault(key, []).append(value)
        click.echo(
            f"run {run + 1}/{runs}: " + ", ".join(f"{k}={v:.2f}" for k, v in figures.items()), err=True
        )

    result["order"] = "rotated run by run (on a GPU: loads, then saves, each group rotated)"
    result["bytes_expected"] = runs * cpu.nbytes  # per baseline: the last call of each run checked
    result["bytes_verified"] = verified
    if gpu is not None:
        result["bytes_expected_gpu"] = runs * gpu.nbytes  # per GPU baseline (H2D, D2H)
    for key, values in samples.items():
        result[key] = round(statistics.median(values), 3)
        result[f"spread_{key}"] = _spread(values)
    for ratio, (ours, theirs) in RATIOS.items():
        if ours in samples:
            per_run = [a / b for a, b in zip(samples[ours], samples[theirs], strict=True)]
            result[ratio] = round(statistics.median(per_run), 3)
            result[f"spread_{ratio}"] = _spread(per_run)
    if not as_json:
        click.echo(
            f"CPU ({cpu_layout}): gather {result['gather_gbps']:.2f} GB/s (x{result['ratio_gather_vs_memcpy']:.2f} "
            f"memcpy, x{result['ratio_gather_vs_torch']:.2f} torch), scatter {result['scatter_gbps']:.2f} GB/s "
            f"(x{result['ratio_scatter_vs_memcpy']:.2f} memcpy, x{result['ratio_scatter_vs_torch']:.2f} torch)"
        )
        if gpu is not None:
            click.echo(
                f"GPU: load {result['load_gbps']:.2f} GB/s (x{result['ratio_load_vs_h2d']:.2f} H2D), "
                f"save {result['save_gbps']:.2f} GB/s (x{result['ratio_save_vs_d2h']:.2f} D2H)"
            )
    click.echo(json.dumps(result))
