"""Queued saves at shutdown: flushed within the deadline (``shutdown_flush_ms``), reported in one log
line (stored / dropped, chunks and tokens), and flushed on SIGINT/SIGTERM before the signal goes on
to the handler it replaced (vLLM's), never swallowing it.

The pool is a real in-process pool whose writes take a while (``SlowPool``: a sleep in
``put_many``, standing in for a slow network); the caches are real CPU paged caches.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from kvpool.cachenode.core.settings import load_settings
from kvpool.connector import chunkfmt
from kvpool.connector.backend import SafePool
from kvpool.connector.paged import LAYOUTS
from kvpool.connector.saver import Saver
from kvpool.connector.transfer import PagedCache

L, H, D, N, C = 2, 2, 16, 8, 32  # layers, kv heads, head dim, block tokens, chunk tokens
FP = b"f" * 32


class SlowPool:
    """A dict pool whose every write takes ``delay`` seconds."""

    name = "slow pool"

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.data: dict[bytes, bytes] = {}
        self.writes = 0

    def prefix_hits(self, keys):
        n = 0
        while n < len(keys) and keys[n] in self.data:
            n += 1
        return n

    def lease_prefix(self, keys, lease_ms):
        return self.prefix_hits(keys), 0

    def release(self, lease_id, keys):
        pass

    def get_many(self, keys):
        return [self.data.get(k) for k in keys]

    def put_many(self, items):
        time.sleep(self.delay)
        for k, v in items:
            self.data[k] = bytes(v)
        self.writes += 1

    def delete(self, keys):
        for k in keys:
            self.data.pop(k, None)

    def close(self):
        pass


def _cache() -> PagedCache:
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(32, H, N, 2 * D, generator=g).to(torch.bfloat16) for _ in range(L)]
    return PagedCache(LAYOUTS["cpu"](), layers, block_size=N, ratio=1, chunk_shape=(L, 2, C, H, D))


def _chunks(first: int, n: int):
    per = C // N
    return [
        (
            chunkfmt.ChunkSpec(bytes([first + i]) * 32, FP, "bfloat16", (L, 2, C, H, D), C),
            list(range((first + i) * per, (first + i + 1) * per)),
        )
        for i in range(n)
    ]


def _queue_three_jobs(saver: Saver) -> None:
    """Three requests, two chunks each: six chunks, 6 * C tokens queued."""
    for r in range(3):
        assert saver.save(f"req{r}", _chunks(2 * r, 2)) == 2


def _kvpool_lines(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("kvpool") and "saves flushed" in r.getMessage()
    ]


def test_close_waits_for_queued_saves_within_the_deadline_and_says_what_it_stored(caplog):
    pool = SlowPool(delay=0.1)
    saver = Saver(_cache(), SafePool(pool), 16 << 20)
    _queue_three_jobs(saver)
    with caplog.at_level(logging.INFO, logger="kvpool"):
        saver.close(5.0, why="engine shutdown")
    assert len(pool.data) == 6 and pool.writes == 3
    (line,) = _kvpool_lines(caplog)
    assert "(engine shutdown)" in line
    assert f"stored {6 * C} tokens (6 chunks)" in line and "dropped 0 tokens (0 chunks)" in line


def test_negative_control_past_the_deadline_queued_saves_are_dropped_and_the_log_says_so(caplog):
    """The control for the test above and for the serve test: a deadline of 0 with a slow pool
    loses chunks, and the report counts them as dropped; what was still queued is never sent."""
    pool = SlowPool(delay=0.3)
    saver = Saver(_cache(), SafePool(pool), 16 << 20)
    _queue_three_jobs(saver)
    with caplog.at_level(logging.INFO, logger="kvpool"):
        saver.close(0.0)
    (line,) = _kvpool_lines(caplog)
    assert f"dropped {6 * C} tokens (6 chunks)" in line and "stored 0 tokens (0 chunks)" in line
    assert "unwritten at the 0 ms deadline" in line
    time.sleep(1.0)  # the write in flight at the deadline may land; the queued ones never do
    assert len(pool.data) <= 2 and pool.writes <= 1


def test_a_flush_that_is_not_final_keeps_the_saver_working(caplog):
    """A signal's flush (vLLM may keep stepping after SIGINT, in drain mode) reports and leaves
    the saver open; a part that misses the deadline is reported as not yet written."""
    pool = SlowPool(delay=0.2)
    saver = Saver(_cache(), SafePool(pool), 16 << 20)
    _queue_three_jobs(saver)
    with caplog.at_level(logging.INFO, logger="kvpool"):
        report = saver.flush_report(0.3, "SIGTERM")
        assert 1 <= report["stored_chunks"] // 2 <= 2 and report["dropped_chunks"] >= 2
        assert report["stored_chunks"] + report["dropped_chunks"] == 6
        assert saver.save("later", _chunks(6, 1)) == 1  # still open
        saver.close(5.0)
    assert len(pool.data) == 7
    lines = _kvpool_lines(caplog)
    assert len(lines) == 2 and "(SIGTERM)" in lines[0]


def test_shutdown_flush_ms_setting_is_read_and_validated():
    assert load_settings({}).shutdown_flush_ms == 5000
    assert load_settings({}, env={"KVPOOL_SHUTDOWN_FLUSH_MS": "250"}).shutdown_flush_ms == 250
    assert load_settings({"shutdown_flush_ms": 0}).shutdown_flush_ms == 0
    for bad in (-1, 600_001):
        with pytest.raises(ValueError, match="shutdown_flush_ms"):
            load_settings({"shutdown_flush_ms": bad})


# A real process: vLLM's worker installs its handler (SystemExit) before the connector registers
# its saver; a signal must flush the saver, then reach that handler.
CHILD = textwrap.dedent(
    """
    import logging, os, signal, sys, time
    sys.path.insert(0, {here!r})
    from test_shutdown_flush import SlowPool, _cache, _queue_three_jobs
    from kvpool.connector import shutdown
    from kvpool.connector.backend import SafePool
    from kvpool.connector.saver import Saver

    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stdout)
    mode = sys.argv[1]
    if mode == "vllm":
        def vllm_handler(signum, frame):  # what vLLM's WorkerProc does
            print("previous handler ran", flush=True)
            raise SystemExit(3)
        signal.signal(signal.SIGINT, vllm_handler)
        signal.signal(signal.SIGTERM, vllm_handler)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pool = SlowPool(delay=0.2)
    saver = Saver(_cache(), SafePool(pool), 16 << 20)
    shutdown.register(saver, float(sys.argv[3]))
    _queue_three_jobs(saver)
    try:
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        time.sleep(5)
        print("signal swallowed", flush=True)
    finally:
        print("pool holds", len(pool.data), flush=True)
    """
)


def _child(tmp_path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(here=str(__import__("pathlib").Path(__file__).parent)))
    return subprocess.run(
        [sys.executable, "-P", str(script), *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_flushes_the_saver_then_reaches_the_handler_it_replaced(tmp_path, sig):
    out = _child(tmp_path, "vllm", sig, "5")
    assert out.returncode == 3, out.stdout + out.stderr  # vLLM's SystemExit(3) went through
    text = out.stdout
    assert f"saves flushed ({sig})" in text and f"stored {6 * C} tokens (6 chunks)" in text, text
    assert "previous handler ran" in text and "pool holds 6" in text and "swallowed" not in text
    assert text.index("saves flushed") < text.index("previous handler ran")


def test_a_signal_with_the_default_action_still_kills_the_process_after_the_flush(tmp_path):
    out = _child(tmp_path, "default", "SIGTERM", "5")
    assert out.returncode == -signal.SIGTERM, out.stdout + out.stderr
    assert f"stored {6 * C} tokens (6 chunks)" in out.stdout and "swallowed" not in out.stdout


def test_the_signal_flush_is_bounded_by_its_deadline(tmp_path):
    t0 = time.monotonic()
    out = _child(tmp_path, "vllm", "SIGINT", "0.1")
    assert out.returncode == 3, out.stdout + out.stderr
    (line,) = [x for x in out.stdout.splitlines() if "saves flushed (SIGINT)" in x]
    assert "dropped 0 tokens" not in line and "deadline" in line  # 0.6 s of writes do not fit in 0.1 s
    assert time.monotonic() - t0 < 30


def test_handlers_are_only_installed_from_the_main_thread():
    from kvpool.connector import shutdown

    result = []
    t = threading.Thread(target=lambda: result.append(shutdown.install_handlers()))
    t.start()
    t.join()
    assert result == [False]
