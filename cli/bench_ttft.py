"""`kvpool bench ttft`: TTFT with a warm pool vs the cache off, same engine settings and prompts."""

from __future__ import annotations

import json
import os

import click

from .options import option


def _quiet_vllm() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")


@click.command("ttft")
@option("--model", type=click.Path(exists=True, file_okay=False), default=None,
        help="Local model directory (default: the generated tiny Llama).")  # fmt: skip
@option("--lengths", default="512,1024,2048,4096", show_default=True, help="Prompt lengths in tokens.")
@option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True, help="Samples per median.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def ttft(model: str | None, lengths: str, repeats: int, as_json: bool) -> None:
    """Same engine and prompt: TTFT with a warm kvpool pool vs the cache off.

    On a CPU with the tiny model the figures are indicative only: prefill of a 2-layer model is
    cheap, so the ratio understates what a real model on a GPU gains.
    """
    _quiet_vllm()
    from kvpool.connector.tinymodel import ensure_tiny_model
    from kvpool.connector.ttft import run_ttft_bench

    path = model or str(ensure_tiny_model())
    ns = sorted({int(x) for x in lengths.split(",") if x.strip()})
    result = run_ttft_bench(path, ns, repeats=repeats, progress=lambda m: click.echo(m, err=True))
    out = {"model": path, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}}
    if as_json:
        click.echo(json.dumps(out))
        return
    for n in ns:
        click.echo(
            f"{n:>6} tokens: TTFT off {out[f'baseline_ttft_ms_{n}']:8.1f} ms, warm pool {out[f'ttft_ms_{n}']:8.1f} ms "
            f"({out[f'ratio_ttft_{n}']:.2f}x), {out[f'cached_tokens_{n}']} tokens from cache"
        )
    click.echo(f"connector overhead on a miss: {out['connector_miss_overhead_ms']:.3f} ms per request")
    click.echo(f"outputs identical: {'yes' if out['outputs_identical'] else 'NO'}")
