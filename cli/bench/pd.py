"""`kvpool bench pd`: disaggregated prefill through a pool — the decode engine's TTFT for a prompt a
prefill engine computed, against the same engine settings computing the prompt (cache off)."""

from __future__ import annotations

import json

import click

from ..options import option
from .ttft import _lengths, _quiet_vllm


@click.command("pd")
@option("--model", type=click.Path(exists=True, file_okay=False), default=None,
        help="Local model directory (default: the generated tiny Llama).")  # fmt: skip
@option("--lengths", default="512,1024,2048,4096", show_default=True, help="Prompt lengths in tokens.")
@option("--repeats", type=click.IntRange(1, 100), default=5, show_default=True, help="Samples per median.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def pd(model: str | None, lengths: str, repeats: int, as_json: bool) -> None:
    """Decode-side TTFT with disaggregated prefill vs the decode engine prefilling the prompt itself.

    A `kvpool up` pool, then three engines in turn: cache off (the baseline), a kv_producer that
    prefills each prompt (max_tokens=1), and a kv_consumer that gets each prompt with the producer's
    kv_transfer_params, as a router forwards them. Reports each length's TTFT, the ratio, and the
    share of prompt tokens the decode engine loaded rather than computed. On a CPU with the tiny
    model the figures are indicative only (its prefill is cheap).
    """
    ns = _lengths(lengths, "--lengths")
    _quiet_vllm()
    from kvpool.cli.devtools.pd import run_pd_bench
    from kvpool.cli.devtools.tinymodel import ensure_tiny_model

    path = model or str(ensure_tiny_model())
    result = run_pd_bench(path, ns, repeats=repeats, progress=lambda m: click.echo(m, err=True))
    out = {"model": path, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}}
    if as_json:
        click.echo(json.dumps(out))
        return
    for n in ns:
        click.echo(
            f"{n:>6} tokens: TTFT prefilled here {out[f'baseline_ttft_ms_{n}']:8.1f} ms, prefilled by the "
            f"producer {out[f'pd_ttft_ms_{n}']:8.1f} ms ({out[f'ratio_pd_ttft_{n}']:.2f}x), "
            f"{100 * out[f'loaded_share_{n}']:.0f}% of the prompt loaded"
        )
    click.echo(
        f"outputs identical: {'yes' if out['outputs_identical'] else 'NO'} (vLLM on {out['vllm_device']})"
    )
