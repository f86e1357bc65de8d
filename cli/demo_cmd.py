"""`kvpool demo`: see the cache work on a real vLLM engine in a minute, with no server and no GPU.

Generates (or reuses) a tiny random Llama, runs a vLLM CPU engine with the embedded pool on
questions about one long shared document, and prints what the cache did next to the same engine
with the cache off: prompt tokens, tokens from cache, TTFT off/on, and whether outputs match.
"""

from __future__ import annotations

import os
import threading
import time

import click

from .options import option

QUESTIONS = [
    "question what does the operator do with a pool",
    "question how does the agent share memory with the engine",
    "question when is a chunk evicted from the disk tier",
]


class _Progress:
    """A one-line ticking status on stderr while something slow (engine start) runs."""

    def __init__(self, text: str) -> None:
        self.text, self._stop = text, threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if not click.get_text_stream("stderr").isatty():
            return  # no ticking into logs and pipes
        while not self._stop.wait(1.0):
            click.echo(f"\r  {self.text} … {time.monotonic() - self._t0:4.0f} s", err=True, nl=False)

    def __enter__(self):
        click.echo(f"  {self.text} …", err=True, nl=False)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        click.echo(f"\r  {self.text} … done in {time.monotonic() - self._t0:.0f} s", err=True)


@click.command("demo")
@option("--model", type=click.Path(exists=True, file_okay=False), default=None,
        help="Local model directory (default: generate a tiny random Llama once and reuse it).")  # fmt: skip
@option("--doc-tokens", type=click.IntRange(256, 16000), default=3000, show_default=True,
        help="Length of the shared document.")  # fmt: skip
@click.option("--verbose", is_flag=True, help="Show vLLM's and kvpool's logs.")
def demo(model: str | None, doc_tokens: int, verbose: bool) -> None:
    """Show a vLLM engine skipping prefill for text it already read, with identical outputs."""
    if not verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("KVPOOL_LOG_LEVEL", "WARNING")
    from kvpool.cli.devtools import ttft as T
    from kvpool.cli.devtools.tinymodel import ensure_tiny_model

    click.echo("kvpool demo: a vLLM engine reusing KV cache through an embedded kvpool pool", err=True)
    with _Progress("preparing the model" if model else "generating a tiny Llama (first run only)"):
        path = model or str(ensure_tiny_model())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    doc = T.prompt_ids(path, doc_tokens, seed=1)
    prompts = [doc + tok.encode(" " + q, add_special_tokens=False) for q in QUESTIONS]
    max_len = max(len(p) for p in prompts) + 64

    with _Progress("starting vLLM engine, cache off"):
        llm = T.build_engine(path, connector=False, max_model_len=max_len)
    warm = T.prompt_ids(path, len(prompts[0]), seed=99)  # another text of the same length
    T.ttft(llm, warm)  # warm the engine's kernels, not its cache
    off = []
    for ids in prompts:
        off.append((T.ttft(llm, ids)[0], list(T.generate(llm, ids).outputs[0].token_ids)))
    T.close_engine(llm)

    with _Progress("starting vLLM engine, kvpool on (embedded pool)"):
        llm = T.build_engine(path, connector=True, max_model_len=max_len)
    rows = []
    T.ttft(llm, warm, salt="warm-up")  # another tenant: seeds nothing the questions can use
    for i, ids in enumerate(prompts):
        seconds, out = T.ttft(llm, ids)
        tokens = list(T.generate(llm, ids).outputs[0].token_ids)
        rows.append((i + 1, len(ids), out.num_cached_tokens, off[i][0], seconds, tokens == off[i][1]))
    T.close_engine(llm)

    click.echo("")
    click.echo(
        f"{'question':>8} {'prompt tokens':>14} {'from cache':>11} {'TTFT off':>10} {'TTFT on':>10} {'identical':>10}"
    )
    for q, n, cached, t_off, t_on, same in rows:
        click.echo(
            f"{q:>8} {n:>14} {cached:>11} {1000 * t_off:>8.1f}ms {1000 * t_on:>8.1f}ms {'yes' if same else 'NO':>10}"
        )
    click.echo("")
    click.echo(
        "Question 1 reads the document for the first time and stores its chunks; questions 2 and 3\n"
        "load them instead of recomputing. vLLM's own prefix cache is off here, so every cached token\n"
        "came from kvpool — as it would for another engine, or this one after a restart with a disk dir.\n"
        "Tiny random model on a CPU: the timings are indicative only; outputs are what must match."
    )
    if not all(r[5] for r in rows):
        raise SystemExit(1)
