"""`kvpool bench ttft`: TTFT with a warm pool vs the cache off, same vLLM engine settings and
prompts, on whatever device the installed vLLM runs (the CPU here; a GPU where vLLM's CUDA build
is installed, with `--model` a real model: that is DESIGN.md §8's GPU figure against vLLM's own
prefill). `--gpu` adds a vLLM-free figure of the load path on a CUDA GPU (ttft_gpu.py: an
8B-shaped model in plain PyTorch), for GPU machines without vLLM."""

from __future__ import annotations

import json
import os

import click

from ..options import option


def _quiet_vllm() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@click.command("ttft")
@option("--model", type=click.Path(exists=True, file_okay=False), default=None,
        help="Local model directory (default: the generated tiny Llama).")  # fmt: skip
@option("--lengths", default="512,1024,2048,4096", show_default=True, help="Prompt lengths in tokens.")
@option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True, help="Samples per median.")
@option(
    "--gpu",
    type=click.Choice(["auto", "on", "off", "only"]),
    default="auto",
    show_default=True,
    help="The vLLM-free GPU load-path figure (8B-shaped model in plain PyTorch: its eager prefill vs "
    "load + the rest of the prompt): auto runs it where torch sees a CUDA GPU; on requires one; only "
    "skips the vLLM engines. The TTFT against vLLM's own prefill is the engines' figure.",
)
@option("--gpu-lengths", default="4096,32768", show_default=True, help="Prompt lengths of the GPU figure.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def ttft(model: str | None, lengths: str, repeats: int, gpu: str, gpu_lengths: str, as_json: bool) -> None:
    """Same engine and prompt: TTFT with a warm kvpool pool vs the cache off.

    Also what a request the pool does not hold costs vLLM's scheduler thread (keys and the
    lookup; devtools/miss_overhead.py), and how many steps requests were skipped because a lookup
    had not answered within the call (0 for a healthy pool).

    On a CPU with the tiny model the figures are indicative only: prefill of a 2-layer model is
    cheap, so the ratio understates what a real model on a GPU gains. Where vLLM runs on a GPU,
    `--model DIR --lengths 4096,32768` gives the GPU figure against vLLM's own prefill (CUDA
    graphs on; the embedded pool sized to hold every prompt).
    """
    out: dict = {}
    gpu_ns = _lengths(gpu_lengths, "--gpu-lengths")
    ns = _lengths(lengths, "--lengths")
    if gpu != "off":
        out.update(_gpu_figures(gpu, gpu_ns, repeats))
    if gpu != "only":
        _quiet_vllm()
        from kvpool.cli.devtools.tinymodel import ensure_tiny_model
        from kvpool.cli.devtools.ttft import run_ttft_bench

        path = model or str(ensure_tiny_model())
        result = run_ttft_bench(path, ns, repeats=repeats, progress=lambda m: click.echo(m, err=True))
        out.update({"model": path, **result})
    out = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}
    if as_json:
        click.echo(json.dumps(out))
        return
    if "gpu_device" in out:
        for n in gpu_ns:
            click.echo(
                f"GPU {n:>6} tokens: prefill {out[f'baseline_gpu_prefill_ms_{n}']:8.1f} ms, load + decode "
                f"{out[f'gpu_ttft_ms_{n}']:8.1f} ms ({out[f'ratio_gpu_ttft_{n}']:.2f}x), "
                f"outputs identical: {'yes' if out[f'gpu_outputs_identical_{n}'] else 'NO'}"
            )
    if gpu == "only":
        return
    for n in ns:
        click.echo(
            f"{n:>6} tokens: TTFT off {out[f'baseline_ttft_ms_{n}']:8.1f} ms, warm pool {out[f'ttft_ms_{n}']:8.1f} ms "
            f"({out[f'ratio_ttft_{n}']:.2f}x), {out[f'cached_tokens_{n}']} tokens from cache"
        )
    click.echo(
        f"connector on a miss: {out['connector_miss_overhead_ms']:.3f} ms on vLLM's scheduler thread per "
        f"request (p90 {out['connector_miss_overhead_p90_ms']:.3f} ms; its parts alone: keys "
        f"{out['connector_miss_keys_ms']:.3f} ms, lookup {out['connector_miss_lookup_ms']:.3f} ms), "
        f"{out['connector_miss_skipped_steps']} skipped steps in {out['connector_miss_requests']} requests"
    )
    click.echo(
        f"engine with the connector: {out['engine_lookup_skipped_steps']:.0f} skipped steps, "
        f"{out['engine_lookups']:.0f} lookups for {out['engine_requests']:.0f} requests"
    )
    click.echo(
        f"outputs identical: {'yes' if out['outputs_identical'] else 'NO'} (vLLM on {out['vllm_device']}, "
        f"embedded pool {out['pool_memory_bytes'] / 2**30:.2f} GiB)"
    )


def _lengths(text: str, flag: str) -> list[int]:
    try:
        ns = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated token counts, got {text!r}", param_hint=flag
        ) from None
    if not ns or ns[0] <= 0:
        raise click.BadParameter(f"expected positive token counts, got {text!r}", param_hint=flag)
    return ns


def _gpu_figures(gpu: str, lengths: list[int], repeats: int) -> dict:
    """The GPU figure, or why it was not measured; `--gpu on`/`only` without a GPU is an error."""
    import torch

    if not torch.cuda.is_available():
        reason = f"no CUDA GPU visible to torch {torch.__version__}"
        if gpu in ("on", "only"):
            raise click.ClickException(f"--gpu {gpu} needs a CUDA GPU: {reason}")
        return {"gpu": f"not measured: {reason}"}
    from . import ttft_gpu

    figures = ttft_gpu.run(lengths, repeats, progress=lambda m: click.echo(m, err=True))
    torch.cuda.empty_cache()  # the model's weights are gone: leave the memory to vLLM's engine
    return figures
