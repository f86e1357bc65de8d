"""Worker side: KV between pool values and vLLM's paged cache, all layers of a chunk per call.

Loads (``Loader``): a window of chunks (about ``WINDOW_BYTES``, at least one chunk) is received
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

Saves (``Saver``): a chunk computed in an earlier step is gathered (``kvcopy.gather_chunks``) into
the payload of a pooled host buffer (pinned on GPUs, on a side stream ordered after the compute
stream, with an event), and the loader-independent writer thread seals the header in front of it
(chunkfmt.seal: no copy) and writes it to the pool. The buffers are the write queue: their budget
bounds it in bytes; a chunk that finds no free buffer is dropped (counted), never waited for.

Any failure — a missing, late or corrupt chunk, a pool error, a device error — ends the load at
that chunk: the chunks before it are in place, the rest are reported failed and vLLM recomputes
them.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvpool.cachenode.client.buffers import BufferPool, PooledBuffer, set_default_device

from . import chunkfmt, kvcopy, metrics
from .backend import Held, SafePool
from .paged import PagedLayout, kernel_block_ids

log = logging.getLogger(__name__)

WINDOW_BYTES = 128 << 20  # host bytes a load receives at once (at least one chunk): several
# chunks of an 8B model (32 MiB each), so their checksums run in parallel; two windows fit the
# client's default receive budget (256 MiB)
VERIFY_THREADS = 4  # chunks of a window verified in parallel (xxh3 releases the GIL)
PARALLEL_VERIFY_BYTES = 1 << 20  # below this a chunk is verified inline: a thread hop costs more

# Values of the embedded pool are read-only views; the copies only ever read them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


@dataclass(frozen=True)
class PagedCache:
    """One worker's registered paged KV cache, as the copy kernels take it."""

    layout: PagedLayout
    layers: list[torch.Tensor]  # per-layer caches, in model layer order
    block_size: int  # tokens per scheduler block
    ratio: int  # kernel blocks per scheduler block
    chunk_shape: tuple[int, ...]  # [layers, 2, chunk tokens, kv heads, head dim]

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].dtype

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def kernel_ids(self, block_ids: Sequence[int]) -> list[int]:
        return kernel_block_ids(list(block_ids), self.ratio)

    def chunk_tensor(self, payload) -> torch.Tensor:
        """A chunk's payload bytes as its ``[layers, 2, tokens, heads, dim]`` tensor (no copy)."""
        return torch.frombuffer(payload, dtype=self.dtype).view(self.chunk_shape)


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
        bind_device(self._device)  # before any CUDA call of this thread
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
                    with _on(stream):
                        for piece in window if bad is None else window[: window.index(bad)]:
                            self._scatter(piece, range(len(self.cache.layers)))
                        event = self._record(stream)
                except Exception as exc:  # a device error: a miss from this window on
                    _device_error(exc)
                    _release(held)
                    failed = window[0]
                    break
                in_flight.append((window[0], held, event))
                if len(in_flight) > 1 and not self._retire(in_flight.pop(0)):
                    failed = pieces[start - self._window]
                    break
                if bad is not None:
                    failed = bad
                    break
        finally:
            for entry in in_flight:
                if not self._retire(entry) and (failed is None or entry[0].index < failed.index):
                    failed = entry[0]
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
        _release(prepared.held)
        self._release_lease(prepared.job)
        pieces = _plan(prepared.job, self.cache, self._chunk_tokens)
        first_bad = pieces[0] if failed and pieces else prepared.failed
        return _result(prepared.job, pieces, first_bad, seconds)

    # -- parts -----------------------------------------------------------------------------------
    def _receive(self, window: list[_Piece]) -> tuple[list, _Piece | None]:
        """Receive a window into held buffers and verify it: (held values, first bad piece)."""
        held = self.pool.get_many_into([p.key for p in window])
        found = [h for h in held if h is not None]
        try:
            payloads = self._verify_all(window, held)
            for piece, payload in zip(window, payloads, strict=True):
                if payload is None:
                    return found, piece
                piece.source = self._source(payload, piece, found)
        except Exception as exc:  # e.g. pinned staging that cannot be had: a miss from here
            log.warning("kvpool: load of chunk %s… failed (%s)", window[0].key.hex()[:12], exc)
            metrics.ERRORS.labels(kind=f"load:{type(exc).__name__}").inc()
            return found, next((p for p in window if p.source is None), window[0])
        return found, None

    def _verify_all(self, window: list[_Piece], held: list) -> list[memoryview | None]:
        """Each value's verified payload, None from the first that is missing or bad on."""
        if self._parallel and len(window) > 1:
            with self._cond:
                if self._verifiers is None:
                    self._verifiers = ThreadPoolExecutor(
                        VERIFY_THREADS, thread_name_prefix="kvpool-verify", initializer=self._bind_thread
                    )
            payloads = list(self._verifiers.map(self._verify, [p.key for p in window], held))
        else:
            payloads = [self._verify(p.key, h) for p, h in zip(window, held, strict=True)]
        for i, payload in enumerate(payloads):
            if payload is None:
                return payloads[:i] + [None] * (len(payloads) - i)
        return payloads

    def _bind_thread(self) -> None:
        bind_device(self._device)

    def _verify(self, key: bytes, value: Held | None) -> memoryview | None:
        if value is None or value.view is None:
            return None
        try:
            return chunkfmt.decode(value.view, self._spec(key))
        except chunkfmt.ChunkVersionError as exc:
            # Never readable by this engine, and found again by every lookup: a request would
            # load it, fail and look it up again. Deleted, so that the recomputed chunk replaces it.
            metrics.ERRORS.labels(kind="chunk_format_version").inc()
            log.warning(
                "kvpool: chunk %s… is of another format (%s); deleting it, recomputing", key.hex()[:12], exc
            )
            self.pool.delete([key])
            return None
        except chunkfmt.ChunkFormatError as exc:
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
            _device_error(exc)
            return False
        finally:
            _release(held)

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


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def worker_device(device: torch.device) -> torch.device:
    """``device`` with its index resolved in the calling (worker) thread: ``cuda`` alone means that
    thread's current device, which another thread would not know."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def bind_device(device: torch.device) -> None:
    """Select the worker's CUDA device in a helper thread before its first CUDA call (nothing on
    the CPU). A new thread starts on device 0: without this, the loader, saver and verify threads of
    a TP rank >= 1 would open a CUDA context on GPU 0 (and their events, pinned registrations and
    kernel launches would go there)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _release(held: list) -> None:
    for h in held:
        h.release()


def _device_error(exc: BaseException) -> None:
    metrics.ERRORS.labels(kind=f"device:{type(exc).__name__}").inc()
    log.warning("kvpool: KV copy failed on the device (%s); recomputing", exc)


def _result(job: LoadJob, pieces: list[_Piece], failed: _Piece | None, seconds: float) -> LoadResult:
    ok = pieces if failed is None else [p for p in pieces if p.index < failed.index]
    return LoadResult(
        job=job,
        ok_tokens=sum(p.hi - p.lo for p in ok),
        ok_chunks=len(ok),
        failed_chunk=None if failed is None else failed.index,
        failed_from_token=None if failed is None else failed.lo,
        seconds=seconds,
    )


def _failed(job: LoadJob, chunk_tokens: int, seconds: float) -> LoadResult:
    """Nothing of ``job`` loaded."""
    first = max(job.first_chunk * chunk_tokens, job.start_token)
    return LoadResult(job, 0, 0, job.first_chunk, first, seconds)


# ================================ saves ================================
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
            with _on(stream):
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
            _device_error(exc)
            _release([b for _, b in items])
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
        bind_device(self._device)  # before any CUDA call of this thread (events, unpinning)
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
                _release([b for _, b in job.items])
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
        if self.pool.write([(spec.key, buf.view) for spec, buf in job.items]):
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
