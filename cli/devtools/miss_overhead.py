"""What a request the pool does not hold costs vLLM's scheduler: `kvpool bench ttft`'s miss figures.

vLLM's scheduler calls the connector's ``get_num_new_matched_tokens`` for every new request, in
its own thread, between steps; whatever the connector spends there delays every running request,
and an answer it cannot give yet ("not known", None) makes the request wait a step. So the figure
is measured where vLLM pays it: a real ``ConnectorScheduler`` with the default settings asks, for
fresh 4096-token prompts, an embedded pool that another process owns (as vLLM's engine core asks
the pool its worker process serves), and the time spent inside the calls is summed until one
answers. Skipped steps are counted apart; the time between those calls (a step) is not included.
Beside it, its parts measured on their own: the chunk keys, and one leased lookup.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from types import SimpleNamespace

CHUNK = 256
BLOCK = 128


def own_embedded_pool(engine: str, stop) -> None:
    """A worker process's part: own the embedded pool (and its rendezvous file) until told."""
    from kvpool.connector.backend import open_pool

    owner = open_pool(
        None, memory_bytes=64 << 20, disk_dir=None, disk_bytes=0, timeout_s=0.5, engine_id=engine
    )
    stop.wait(600)
    owner.close()


def _scheduler(pool):
    """A scheduler side as the engine core runs it (one worker, reported), default settings."""
    from kvpool.cachenode.core.settings import load_settings
    from kvpool.connector.keys import ModelFingerprint
    from kvpool.connector.metadata import WorkerReport
    from kvpool.connector.scheduler import ConnectorScheduler

    fp = ModelFingerprint("bench", "", "bfloat16", "LKTHD/cpu", 32, 8, 128, CHUNK)
    side = ConnectorScheduler(
        load_settings({"chunk_size": CHUNK}), pool, tp=1, pp=1, block_size=BLOCK,
        fingerprint=lambda report: fp,
    )  # fmt: skip
    report = WorkerReport(
        tp_rank=0, pp_rank=0, refusals=[], backend="bench", layout="bench", view_dtype="bfloat16",
        num_layers=32, num_kv_heads=8, head_dim=128, identity={"weights": "blake3:bench"},
    )  # fmt: skip
    side.set_worker_reports({(0, 0): report})
    return side, fp


def _in_scheduler(side, rnd: random.Random, n_tokens: int, i: int) -> tuple[float, int]:
    """Seconds inside get_num_new_matched_tokens until a fresh request's answer, and the steps
    it was told to wait (vLLM calls again a step later; here 1 ms later)."""
    ids = [rnd.randrange(50000) for _ in range(n_tokens)]
    req = SimpleNamespace(request_id=f"miss-{i}", prompt_token_ids=ids, num_prompt_tokens=n_tokens)
    spent, skipped = 0.0, 0
    while True:
        t0 = time.perf_counter()
        answer = side.get_num_new_matched_tokens(req, 0)
        spent += time.perf_counter() - t0
        if answer[0] is not None:
            break
        skipped += 1
        if skipped > 10_000:
            raise RuntimeError("the lookup never answered")
        time.sleep(0.001)
    side.update_state_after_alloc(req, 0)
    side.request_finished(req)
    return spent, skipped


def miss_figures(n_tokens: int = 4096, repeats: int = 200) -> dict[str, float]:
    """The connector's cost on vLLM's scheduler thread for requests the pool does not hold (ms,
    medians after 10 warm-up requests) and the steps they were skipped, plus its parts."""
    import multiprocessing

    from kvpool.cachenode.core.settings import ConnectorSettings
    from kvpool.connector.backend import SafePool, rendezvous_path
    from kvpool.connector.keys import chunk_keys
    from kvpool.connector.pools import RendezvousPool

    engine = f"bench-{os.getpid()}"
    path = rendezvous_path(engine)
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    worker = spawn.Process(target=own_embedded_pool, args=(engine, stop), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if not worker.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the pool-owning process did not start its embedded pool")
            time.sleep(0.05)
        pool = SafePool(RendezvousPool(path, 0.5))
        side, fp = _scheduler(pool)
        rnd = random.Random(0)
        calls = [_in_scheduler(side, rnd, n_tokens, i) for i in range(repeats)]
        lease_ms = ConnectorSettings().lease_ms
        keys_s, lookup_s = [], []
        for i in range(repeats):
            ids = [rnd.randrange(50000) for _ in range(n_tokens)]
            t0 = time.perf_counter()
            keys = chunk_keys(fp, ids, salt=str(i))
            t1 = time.perf_counter()
            pool.lease_prefix(keys, lease_ms)  # the connector's lookup (pins hits)
            t2 = time.perf_counter()
            keys_s.append(t1 - t0)
            lookup_s.append(t2 - t1)
        side.shutdown(0)
        pool.close()
    finally:
        stop.set()
        worker.join(10)
        if worker.is_alive():
            worker.kill()
    warm = calls[10:] or calls
    spent = sorted(s for s, _ in warm)
    return {
        "connector_miss_skipped_steps_first10": sum(k for _, k in calls[:10]),
        "connector_miss_overhead_ms": 1000 * statistics.median(spent),
        "connector_miss_overhead_p90_ms": 1000 * spent[math.ceil(0.9 * len(spent)) - 1],
        "connector_miss_skipped_steps": sum(k for _, k in warm),
        "connector_miss_requests": len(warm),
        "connector_miss_keys_ms": 1000 * statistics.median(keys_s[10:] or keys_s),
        "connector_miss_lookup_ms": 1000 * statistics.median(lookup_s[10:] or lookup_s),
    }
