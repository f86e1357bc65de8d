"""Loads (``Loader``): a window of chunks (about ``WINDOW_BYTES``, at least one chunk) is received
straight into pooled host buffers (``SafePool.get_many_into``: the client's page-aligned receive
buffers, pinned where CUDA is), each chunk is verified in place (chunkfmt) and scattered into the
paged cache with ``kvcopy.scatter_chunks`` — one call for all layers of a chunk, the compiled
extension where it is built. On a GPU the kernel reads the pinned buffer directly (no staging copy
on the device) on a side stream; a window's buffers go back to the pool once its copies are done,
while the next window is being received, so at most two windows are held whatever the prompt
length. A background load (vLLM's load-async path) runs all of this in the loader thread while
the engine computes other requests: it writes only blocks of requests vLLM keeps waiting for
this load (``WAITING_FOR_REMOTE_KVS``), which no forward pass reads or writes until the load is
reported finished, and which vLLM does not free before that.

Any failure — a missing, late or corrupt chunk, a pool error, a device error — ends the load at
that chunk: the chunks before it are in place, the rest are reported failed and vLLM recomputes
them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer, set_default_device

from . import chunkfmt, kvcopy, metrics, transfer
from .backend import SafePool
from .pools import Held
from .transfer import PagedCache, device_error, on_stream, release_all, worker_device

log = logging.getLogger(__name__)

WINDOW_BYTES = 128 << 20  # host bytes a load receives at once (at least one chunk): several
# chunks of an 8B model (32 MiB each), so their checksums run in parallel; two windows fit the
# client's default receive budget (256 MiB)
VERIFY_THREADS = 4  # chunks of a window verified in parallel (xxh3 releases the GIL)
PARALLEL_VERIFY_BYTES = 1 << 20  # below this a chunk is verified inline: a thread hop costs more


@dataclass
class LoadJob:
    """One request's chunks to load on this worker: keys of chunks [first_chunk, first_chunk + n)
    into the scheduler blocks that cover tokens [start_token, end_token)."""

    req_id: str
    keys: list[bytes]
    first_chunk: int
    block_ids: list[int]
    start_token: int
    end_token: int
    prompt_tokens: int
    lease_id: int = 0  # the lookup's lease, released once the chunks were read
    lease_keys: list[bytes] = field(default_factory=list)
    after: object = None  # a CUDA event on the compute stream the copies must follow


@dataclass
class LoadResult:
    job: LoadJob
    ok_tokens: int
    ok_chunks: int
    failed_chunk: int | None  # first chunk that did not load (absolute index); None: all loaded
    failed_from_token: int | None
    seconds: float
    failed_why: str | None = None  # why the first failed chunk did not load (miss_reasons.LOAD_FAILURES)

    @property
    def total_tokens(self) -> int:
        return self.job.end_token - self.job.start_token


@dataclass
class _Piece:
    """The part of one chunk a job loads: tokens [lo, hi) into ``ids`` (kernel blocks)."""

    index: int  # absolute chunk index
    key: bytes
    lo: int
    hi: int
    offset: int  # lo - the chunk's first token
    ids: list[int]
    source: torch.Tensor | None = None  # [layers, 2, hi - lo, heads, dim] once verified
    why: str = "internal"  # why it did not load, if it did not (miss_reasons.LOAD_FAILURES)


@dataclass
class Prepared:
    """A synchronous load's chunks, received and verified, held until their copies are done."""

    job: LoadJob
    pieces: list[_Piece]
    held: list[Held | PooledBuffer]
    failed: _Piece | None
    fetch_s: float


def _plan(job: LoadJob, cache: PagedCache, chunk_tokens: int) -> list[_Piece]:
    pieces = []
    bs = cache.block_size
    for j, key in enumerate(job.keys):
        start = (job.first_chunk + j) * chunk_tokens
        lo, hi = max(start, job.start_token), min(start + chunk_tokens, job.end_token)
        blocks = job.block_ids[(lo - job.start_token) // bs : (hi - job.start_token) // bs]
        pieces.append(_Piece(job.first_chunk + j, key, lo, hi, lo - start, cache.kernel_ids(blocks)))
    return pieces


class Loader:
    """Receives, verifies and scatters chunks; ``submit`` runs a job in the loader thread,
    ``run`` and ``prepare`` in the caller's."""

    def __init__(
        self,
        cache: PagedCache,
        pool: SafePool,
        spec: Callable[[bytes], chunkfmt.ChunkSpec],
        chunk_tokens: int,
        *,
        window_bytes: int = WINDOW_BYTES,
    ) -> None:
        self.cache = cache
        self.pool = pool
        self._spec = spec
        self._chunk_tokens = chunk_tokens
        chunk_bytes = spec(b"\0" * 32).encoded_size
        self._window = max(1, window_bytes // chunk_bytes)
        self._parallel = chunk_bytes >= PARALLEL_VERIFY_BYTES
        self._verifiers: ThreadPoolExecutor | None = None
        self._device = worker_device(cache.device)  # what this worker's helper threads select first
        if self._device.type == "cuda":  # and the GPU the pool client's receive buffers pin under
            set_default_device(self._device.index)
        self._stream = torch.cuda.Stream(cache.device) if cache.cuda else None
        self._staging: BufferPool | None = None  # pinned copies of pageable values (CUDA only)
        self._jobs: queue.Queue[LoadJob | None] = queue.Queue()
        self._done: list[LoadResult] = []
        self._cond = threading.Condition()
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    # -- background loads ------------------------------------------------------------------------
    def submit(self, job: LoadJob) -> None:
        """Load ``job`` in the loader thread; its result comes out of ``take_finished``."""
        if self.cache.cuda:
            job.after = torch.cuda.current_stream(self.cache.device).record_event()
        with self._cond:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvpool-load", daemon=True)
                self._thread.start()
        self._jobs.put(job)

    @property
    def side_stream(self):
        """The CUDA stream loads copy on (None on the CPU)."""
        return self._stream

    @property
    def pending(self) -> int:
        """Jobs submitted whose results were not taken yet."""
        return self._pending

    def take_finished(self, wait_s: float = 0.0) -> list[LoadResult]:
        """Results of finished background jobs; waits up to ``wait_s`` for one if none is ready."""
        with self._cond:
            if not self._done and self._pending and wait_s > 0:
                self._cond.wait(wait_s)
            done, self._done = self._done, []
            self._pending -= len(done)
        return done

    def _loop(self) -> None:
        transfer.bind_device(self._device)  # before any CUDA call of this thread
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                result = self.run(job, background=True)
            except Exception as exc:  # never lose a job: vLLM waits for every one
                log.exception("kvpool: load of %s failed", job.req_id)
                metrics.ERRORS.labels(kind=f"load:{type(exc).__name__}").inc()
                result = _failed(job, self._chunk_tokens, 0.0)
            with self._cond:
                self._done.append(result)
                self._cond.notify_all()

    # -- loads ---------------------------------------------------------------------------------
    def run(self, job: LoadJob, *, background: bool = False) -> LoadResult:
        """Load ``job`` window by window: receive the next window while the copies of the last
        one run; at most two windows of buffers are held. In the background on the side stream
        (after ``job.after``), else on the current stream."""
        t0 = time.perf_counter()
        pieces = _plan(job, self.cache, self._chunk_tokens)
        stream = self._stream if background else None
        failed: _Piece | None = None  # the first chunk that did not load
        in_flight: list[tuple[_Piece, list, object]] = []  # (first piece, held values, event)
        try:
            if stream is not None and job.after is not None:
                stream.wait_event(job.after)
            for start in range(0, len(pieces), self._window):
                window = pieces[start : start + self._window]
                held, bad = self._receive(window)
                try:
                    with on_stream(stream):
                        for piece in window if bad is None else window[: window.index(bad)]:
                            self._scatter(piece, range(len(self.cache.layers)))
                        event = self._record(stream)
                except Exception as exc:  # a device error: a miss from this window on
                    device_error(exc)
                    release_all(held)
                    failed = _why(window[0], "device")
                    break
                in_flight.append((window[0], held, event))
                if len(in_flight) > 1 and not self._retire(in_flight.pop(0)):
                    failed = _why(pieces[start - self._window], "device")
                    break
                if bad is not None:
                    failed = bad
                    break
        finally:
            for entry in in_flight:
                if not self._retire(entry) and (failed is None or entry[0].index < failed.index):
                    failed = _why(entry[0], "device")
            self._release_lease(job)
        return _result(job, pieces, failed, time.perf_counter() - t0)

    def fits_prepare(self, jobs: Sequence[LoadJob]) -> bool:
        """Whether ``jobs`` may all be held at once (``prepare``): no more chunks than the two
        windows ``run`` holds at most, so host buffers stay bounded whatever the prompt length."""
        return sum(len(job.keys) for job in jobs) <= 2 * self._window

    def prepare(self, job: LoadJob) -> Prepared:
        """Receive and verify every chunk of ``job`` now; the caller scatters them (layer by
        layer) and hands the result to ``finish``. Holds every chunk until then: only for jobs
        that ``fits_prepare``."""
        t0 = time.perf_counter()
        pieces = _plan(job, self.cache, self._chunk_tokens)
        held_all: list = []
        failed = None
        for start in range(0, len(pieces), self._window):
            held, bad = self._receive(pieces[start : start + self._window])
            held_all += held
            if bad is not None:
                failed = bad
                break
        good = pieces if failed is None else pieces[: pieces.index(failed)]
        return Prepared(job, good, held_all, failed, time.perf_counter() - t0)

    def scatter_layer(self, prepared: Prepared, layer: int) -> None:
        """One layer of every chunk of a prepared load, on the current stream."""
        for piece in prepared.pieces:
            self._scatter(piece, range(layer, layer + 1))

    def finish(self, prepared: Prepared, failed: bool, seconds: float) -> LoadResult:
        """A prepared load whose copies are done: its buffers go back, its lease is released."""
        release_all(prepared.held)
        self._release_lease(prepared.job)
        pieces = _plan(prepared.job, self.cache, self._chunk_tokens)
        first_bad = _why(pieces[0], "device") if failed and pieces else prepared.failed
        return _result(prepared.job, pieces, first_bad, seconds)

    # -- parts -----------------------------------------------------------------------------------
    def _receive(self, window: list[_Piece]) -> tuple[list, _Piece | None]:
        """Receive a window into held buffers and verify it: (held values, first bad piece)."""
        held, get_failed = self.pool.fetch_into([p.key for p in window])
        found = [h for h in held if h is not None]
        try:
            payloads = self._verify_all(window, held)
            for piece, payload, value in zip(window, payloads, held, strict=True):
                if payload is None:
                    # found by the lookup, absent now: evicted (or deleted, or its node lost),
                    # unless the read itself failed; a value that was there failed its checks
                    piece.why = (get_failed or "evicted") if value is None else piece.why
                    return found, piece
                piece.source = self._source(payload, piece, found)
        except Exception as exc:  # e.g. pinned staging that cannot be had: a miss from here
            log.warning("kvpool: load of chunk %s… failed (%s)", window[0].key.hex()[:12], exc)
            metrics.ERRORS.labels(kind=f"load:{type(exc).__name__}").inc()
            return found, _why(next((p for p in window if p.source is None), window[0]), "internal")
        return found, None

    def _verify_all(self, window: list[_Piece], held: list) -> list[memoryview | None]:
        """Each value's verified payload, None from the first that is missing or bad on (a bad
        one's piece says why)."""
        if self._parallel and len(window) > 1:
            with self._cond:
                if self._verifiers is None:
                    self._verifiers = ThreadPoolExecutor(
                        VERIFY_THREADS, thread_name_prefix="kvpool-verify", initializer=self._bind_thread
                    )
            payloads = list(self._verifiers.map(self._verify, window, held))
        else:
            payloads = [self._verify(p, h) for p, h in zip(window, held, strict=True)]
        for i, payload in enumerate(payloads):
            if payload is None:
                return payloads[:i] + [None] * (len(payloads) - i)
        return payloads

    def _bind_thread(self) -> None:
        transfer.bind_device(self._device)

    def _verify(self, piece: _Piece, value: Held | None) -> memoryview | None:
        key = piece.key
        if value is None or value.view is None:
            return None
        try:
            return chunkfmt.decode(value.view, self._spec(key))
        except chunkfmt.ChunkVersionError as exc:
            piece.why = "format_version"
            # Never readable by this engine, and found again by every lookup: a request would
            # load it, fail and look it up again. Deleted, so that the recomputed chunk replaces it.
            metrics.ERRORS.labels(kind="chunk_format_version").inc()
            log.warning(
                "kvpool: chunk %s… is of another format (%s); deleting it, recomputing", key.hex()[:12], exc
            )
            self.pool.delete([key])
            return None
        except chunkfmt.ChunkFormatError as exc:
            piece.why = "corrupt"
            metrics.STATS.add("corrupt_chunks")
            metrics.ERRORS.labels(kind="corrupt_chunk").inc()
            log.warning("kvpool: rejected chunk %s… (%s); deleting it, recomputing", key.hex()[:12], exc)
            self.pool.delete([key])
            return None

    def _source(self, payload: memoryview, piece: _Piece, held: list) -> torch.Tensor:
        """The piece's tokens of a verified payload, where the copy kernel can read them: a
        pageable value (the embedded pool's memory) is first copied into pinned staging on CUDA."""
        data = self.cache.chunk_tensor(payload)
        if self.cache.cuda and not data.is_pinned():
            with self._cond:
                if self._staging is None:  # two windows: what a load holds at most
                    self._staging = BufferPool(
                        2 * self._window * payload.nbytes + (1 << 20),
                        prefault=False,
                        device=self._device.index,
                    )
            buf = self._staging.acquire(payload.nbytes)
            if buf is None:
                raise RuntimeError("pinned staging for pageable values is full")
            held.append(buf)
            buf.view[:] = payload
            data = self.cache.chunk_tensor(buf.view)
        return data[:, :, piece.offset : piece.offset + piece.hi - piece.lo]

    def _scatter(self, piece: _Piece, layers: range) -> None:
        kv = self.cache.layers[layers.start : layers.stop]
        src = piece.source[layers.start : layers.stop]
        kvcopy.scatter_chunks(self.cache.layout, kv, piece.ids, src, non_blocking=True)

    def _record(self, stream):
        if not self.cache.cuda:
            return None
        return (stream or torch.cuda.current_stream(self.cache.device)).record_event()

    @staticmethod
    def _retire(entry) -> bool:
        """Wait for a window's copies, then give its buffers back; False on a device error."""
        _first, held, event = entry
        try:
            if event is not None:
                event.synchronize()
            return True
        except Exception as exc:
            device_error(exc)
            return False
        finally:
            release_all(held)

    def _release_lease(self, job: LoadJob) -> None:
        if job.lease_id and job.lease_keys:
            self.pool.release(job.lease_id, job.lease_keys)

    def close(self, timeout: float = 10.0) -> None:
        """Finish the jobs already submitted (vLLM waits for them), then stop."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
        if self._verifiers is not None:
            self._verifiers.shutdown(wait=False)
        if self._staging is not None:
            self._staging.close()


def _result(job: LoadJob, pieces: list[_Piece], failed: _Piece | None, seconds: float) -> LoadResult:
    ok = pieces if failed is None else [p for p in pieces if p.index < failed.index]
    return LoadResult(
        job=job,
        ok_tokens=sum(p.hi - p.lo for p in ok),
        ok_chunks=len(ok),
        failed_chunk=None if failed is None else failed.index,
        failed_from_token=None if failed is None else failed.lo,
        seconds=seconds,
        failed_why=None if failed is None else failed.why,
    )


def _why(piece: _Piece, why: str) -> _Piece:
    piece.why = why
    return piece


def _failed(job: LoadJob, chunk_tokens: int, seconds: float) -> LoadResult:
    """Nothing of ``job`` loaded."""
    first = max(job.first_chunk * chunk_tokens, job.start_token)
    return LoadResult(job, 0, 0, job.first_chunk, first, seconds, "internal")
