"""Saves (``Saver``): a chunk computed in an earlier step is gathered (``kvcopy.gather_chunks``) into
the payload of a pooled host buffer (pinned on GPUs, on a side stream ordered after the compute
stream, with an event), and the loader-independent writer thread seals the header in front of it
(chunkfmt.seal: no copy) and writes it to the pool. The buffers are the write queue: their budget
bounds it in bytes; a chunk that finds no free buffer is dropped (counted), never waited for.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer

from . import chunkfmt, kvcopy, metrics, transfer
from .backend import SafePool
from .transfer import PagedCache, device_error, on_stream, release_all, worker_device

log = logging.getLogger(__name__)


@dataclass
class _SaveJob:
    req_id: str
    items: list[tuple[chunkfmt.ChunkSpec, PooledBuffer]]
    event: object  # CUDA event after the gathers, or None
    started: float


class Saver:
    """Copies chunks out of the paged cache into pooled host buffers and writes them to the pool
    from its own thread. ``save`` returns at once (on a GPU the copies run on a side stream)."""

    def __init__(self, cache: PagedCache, pool: SafePool, budget: int) -> None:
        self.cache = cache
        self.pool = pool
        self._budget = budget
        self._buffers: BufferPool | None = None
        self._device = worker_device(cache.device)  # what the writer thread selects first
        self._stream = torch.cuda.Stream(cache.device) if cache.cuda else None
        self._events: dict[str, list] = {}  # request → CUDA events of gathers not yet seen done
        self._last_event = None
        self._queue: queue.Queue[_SaveJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._unfinished = 0
        self._lock = threading.Lock()
        self._closed = False
        # accounting for the shutdown report; plain ints written by one thread each, read anywhere
        # (a signal handler must not take a lock the interrupted main thread may hold)
        self._queued = [0, 0]  # chunks, tokens handed to the writer (ever)
        self._stored = [0, 0]  # chunks, tokens written to the pool (ever)
        self._failed = [0, 0]  # chunks, tokens whose write failed or was dropped (ever)
        self._abandoned = False  # past the shutdown deadline: queued writes are dropped, not sent
        self._reported = False

    def save(self, req_id: str, chunks: list[tuple[chunkfmt.ChunkSpec, list[int]]]) -> int:
        """Copy out each (spec, scheduler blocks) chunk and queue its write; returns how many
        were taken (the rest found no free buffer or failed to copy: dropped, counted)."""
        if self._closed or not chunks or self._budget <= 0:
            return 0
        t0 = time.perf_counter()
        items: list[tuple[chunkfmt.ChunkSpec, PooledBuffer]] = []
        stream = self._stream
        try:
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(self.cache.device))
            with on_stream(stream):
                for spec, blocks in chunks:
                    buf = self._acquire(spec.encoded_size)
                    if buf is None:
                        metrics.ERRORS.labels(kind="save:buffers_full").inc()
                        break
                    items.append((spec, buf))
                    out = self.cache.chunk_tensor(chunkfmt.payload_view(buf.view, spec))
                    kvcopy.gather_chunks(
                        self.cache.layout,
                        self.cache.layers,
                        self.cache.kernel_ids(blocks),
                        out,
                        non_blocking=True,
                    )
                event = stream.record_event() if stream is not None else None
        except Exception as exc:
            device_error(exc)
            release_all([b for _, b in items])
            return 0
        if not items:
            return 0
        if event is not None:
            self._events.setdefault(req_id, []).append(event)
            self._last_event = event
        with self._lock:
            self._unfinished += 1
            self._queued[0] += len(items)
            self._queued[1] += sum(spec.token_count for spec, _ in items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvpool-save", daemon=True)
                self._thread.start()
        self._queue.put(_SaveJob(req_id, items, event, t0))
        return len(items)

    def _acquire(self, nbytes: int) -> PooledBuffer | None:
        if self._buffers is None:
            self._buffers = BufferPool(max(self._budget, nbytes), prefault=False, device=self._device.index)
        try:
            return self._buffers.acquire(nbytes, timeout=0)
        except ValueError:  # a chunk larger than the whole budget
            return None

    def copied(self, req_id: str) -> bool:
        """Whether every gather of ``req_id`` has finished reading its blocks (they may be freed)."""
        events = self._events.get(req_id)
        if not events:
            return True
        if all(e.query() for e in events):
            del self._events[req_id]
            return True
        return False

    def fence(self) -> None:
        """Make the compute stream wait for every gather issued so far: blocks vLLM frees now
        (a preempted request's) may be written by the next forward pass."""
        if self._last_event is not None and not self._last_event.query():
            torch.cuda.current_stream(self.cache.device).wait_event(self._last_event)

    def _loop(self) -> None:
        transfer.bind_device(self._device)  # before any CUDA call of this thread (events, unpinning)
        while True:
            job = self._queue.get()
            if job is None:
                return
            ok = False
            try:
                if not self._abandoned:  # past the shutdown deadline: dropped (reported)
                    ok = self._write(job)
            except Exception as exc:
                log.warning("kvpool: save of %s failed (%s)", job.req_id, exc)
                metrics.ERRORS.labels(kind=f"save:{type(exc).__name__}").inc()
            finally:
                release_all([b for _, b in job.items])
                if not ok:
                    self._failed[0] += len(job.items)
                    self._failed[1] += sum(spec.token_count for spec, _ in job.items)
                with self._lock:
                    self._unfinished -= 1

    def _write(self, job: _SaveJob) -> bool:
        if job.event is not None:
            job.event.synchronize()
        for spec, buf in job.items:
            chunkfmt.seal(spec, buf.view)
        if self.pool.put_many([(spec.key, buf.view) for spec, buf in job.items]):
            dt = time.perf_counter() - job.started
            n, tokens = len(job.items), sum(spec.token_count for spec, _ in job.items)
            self._stored[0] += n
            self._stored[1] += tokens
            metrics.STATS.observe("store_seconds", dt)
            metrics.STATS.add("stored_tokens", tokens)
            log.info(
                "Stored %d tokens (%d chunk%s) to %s in %.1f ms",
                tokens, n, "" if n == 1 else "s", self.pool.name, 1000 * dt,
            )  # fmt: skip
            return True
        return False

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (bounded) until every queued write is done; True when none is left. Takes no lock:
        safe in a signal handler that interrupted the thread calling ``save``."""
        deadline = time.monotonic() + max(0.0, timeout)
        while self._unfinished and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._unfinished

    def flush_report(self, timeout: float, why: str, *, final: bool = False) -> dict[str, int]:
        """Flush (bounded by ``timeout`` seconds) and say in one info line on the ``kvpool``
        logger what was stored meanwhile and what was dropped (failed, or still unwritten at the
        deadline). ``final``: what is still queued after the deadline is never sent; a final
        report with nothing to say is logged only when no report was logged before."""
        t0 = time.monotonic()
        stored0, failed0 = list(self._stored), list(self._failed)
        done = self.flush(timeout)
        if final:
            self._abandoned = True
        queued, stored, failed = list(self._queued), list(self._stored), list(self._failed)
        unwritten = [q - s_ - f for q, s_, f in zip(queued, stored, failed, strict=True)]
        got = [stored[i] - stored0[i] for i in (0, 1)]
        dropped = [failed[i] - failed0[i] + unwritten[i] for i in (0, 1)]
        report = {
            "stored_chunks": got[0], "stored_tokens": got[1],
            "dropped_chunks": dropped[0], "dropped_tokens": dropped[1],
        }  # fmt: skip
        if not final or got[0] or dropped[0] or not self._reported:
            self._reported = True
            log.info(
                "kvpool: saves flushed (%s) in %.1f ms: stored %d tokens (%d chunk%s) to %s, "
                "dropped %d tokens (%d chunk%s)%s",
                why, 1000 * (time.monotonic() - t0), got[1], got[0], "" if got[0] == 1 else "s",
                self.pool.name, dropped[1], dropped[0], "" if dropped[0] == 1 else "s",
                "" if done else f"; {unwritten[0]} chunks unwritten at the {1000 * timeout:.0f} ms deadline",
            )  # fmt: skip
        return report

    def close(self, timeout: float = 10.0, why: str = "shutdown") -> None:
        """Flush (bounded), report, then stop: what is still queued after ``timeout`` is dropped."""
        if self._closed:
            return
        self.flush_report(timeout, why, final=True)
        self._closed = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(min(timeout, 1.0))
        if self._buffers is not None and not self._unfinished:
            self._buffers.close()
