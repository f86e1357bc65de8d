"""The connector's worker side (each vLLM worker process): copies chunks between the pool and the
paged KV cache as the scheduler's metadata orders, and reports what failed.

Chunks are received straight into pooled host buffers, verified (chunkfmt.py) before they touch
the paged cache and scattered with all layers per call (loader.py). From a remote pool they load
in the background while the engine computes other requests (vLLM's load-async path: the request
waits in ``WAITING_FOR_REMOTE_KVS`` until every worker reported it in ``get_finished``); from the
embedded pool inside the step, layer by layer. Newly computed chunks are copied out to host buffers
and written by a background thread. A chunk that is missing, late, corrupt or from another model,
or a copy that fails on the device, is a miss: its blocks are reported through vLLM's
load-failure path and the request's first failed chunk goes back to the scheduler.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import torch
from vllm.logger import init_logger

from kvpool.cachenode.core.settings import ConnectorSettings

from . import chunkfmt, kvcopy, metrics, miss_reasons, shutdown
from .engine_config import fingerprint_for
from .loader import Loader, LoadJob, LoadResult, Prepared
from .metadata import KVPoolMetadata, KVPoolWorkerMeta, LoadTask, SaveTask, WorkerReport
from .paged import LAYOUTS
from .saver import Saver
from .transfer import PagedCache
from .worker_report import worker_report

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from .backend import SafePool
    from .keys import ModelFingerprint

log = init_logger(__name__)

IDLE_WAIT_S = 0.005  # a step with nothing to compute waits this long for a background load to end


def worker_ranks() -> tuple[int | None, int | None, str | None]:
    """(tp rank, pp rank, None), or no ranks and why: never guessed (a wrong rank would load
    another rank's shard)."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        return get_tp_group().rank_in_group, get_pp_group().rank_in_group, None
    except Exception as exc:
        return None, None, f"the worker's tensor/pipeline-parallel rank is unknown ({exc})"


class ConnectorWorker:
    """The worker-side half of ``KVPoolConnector``; off (reports its refusals) when its cache
    cannot be copied exactly. Every call takes the step's metadata as vLLM bound it."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        settings: ConnectorSettings,
        pool: SafePool,
        *,
        tp_rank: int | None,
        pp_rank: int | None,
        refusals: list[str],
    ) -> None:
        self._vllm_config = vllm_config
        self.settings = settings
        self._pool = pool
        self._tp_rank, self._pp_rank = tp_rank, pp_rank
        self._refusals = refusals
        self._tp = vllm_config.parallel_config.tensor_parallel_size
        self._block_size = vllm_config.cache_config.block_size
        self._C = settings.chunk_size
        self._enabled = False
        self._layers: list[str] = []
        self._layer_index: dict[str, int] = {}
        self._rank = 0
        self._fp: ModelFingerprint | None = None
        self._report: WorkerReport | None = None
        self._loader: Loader | None = None
        self._saver: Saver | None = None
        self._prepared: list[Prepared] = []  # this step's in-step loads, scattered layer by layer
        self._pending_layers: set[int] = set()
        self._layer_events: list = []  # CUDA: one event per layer of the in-step loads
        self._load_started = 0.0
        self._unloaded: list[LoadResult] = []  # background loads refused at once
        self._releasing: set[str] = set()  # finished requests to report once their copies are done
        self._failed_blocks: set[int] = set()
        self._step_failed: dict[str, int] = {}
        self._step_why: dict[str, str] = {}  # request → why its first failed chunk failed
        self._misses: dict[str, dict[str, int]] = {}  # request → its miss reasons, for the load line

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def report(self) -> WorkerReport | None:
        return self._report

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.models.utils import extract_layer_index

        kv = dict(kv_caches)
        self._layers = sorted(kv, key=extract_layer_index)
        self._layer_index = {n: i for i, n in enumerate(self._layers)}
        first = kv[self._layers[0]]
        report = worker_report(
            self._vllm_config, self._layers, first, tp_rank=self._tp_rank, pp_rank=self._pp_rank,
            refusals=list(self._refusals),
        )  # fmt: skip
        self._report = report
        self._enabled = not report.refusals
        if not self._enabled:
            log.warning("kvpool: cache off on this worker: %s", "; ".join(report.refusals))
            return
        self._rank = self._pp_rank * self._tp + self._tp_rank
        self._fp = fingerprint_for(self._vllm_config, self.settings, report)
        _b, h, n, c = first.shape
        self._dtype = report.view_dtype
        self._chunk_shape = (len(self._layers), 2, self._C, h, c // 2)
        cache = PagedCache(
            layout=LAYOUTS[report.layout](),
            layers=[kv[name] for name in self._layers],
            block_size=self._block_size,
            ratio=self._block_size // n,
            chunk_shape=self._chunk_shape,
        )
        self._loader = Loader(cache, self._pool, self._spec, self._C)
        self._saver = Saver(cache, self._pool, self.settings.save_buffer)
        if self.settings.save:
            # queued saves are written before this process exits on SIGINT/SIGTERM (shutdown.py)
            shutdown.register(self._saver, self.settings.shutdown_flush_ms / 1000)
            if self.settings.url:  # connect now, not at the first save (SafePool.warm)
                threading.Thread(target=self._pool.warm, name="kvpool-warm", daemon=True).start()
        log.info(
            "kvpool: %d KV layers registered, view %s %s, layout %s (backend %s), rank tp%d/pp%d; %s",
            len(self._layers), tuple(first.shape), report.view_dtype, report.layout, report.backend,
            self._tp_rank, self._pp_rank, kvcopy.extension_status(),
        )  # fmt: skip

    def _spec(self, key: bytes) -> chunkfmt.ChunkSpec:
        return chunkfmt.ChunkSpec(
            key=key,
            fingerprint=self._fp.digest,
            dtype=self._dtype,
            shape=self._chunk_shape,
            token_count=self._C,
        )

    # -- loads -------------------------------------------------------------------------------------
    def _job(self, task: LoadTask) -> LoadJob:
        return LoadJob(
            req_id=task.req_id,
            keys=task.keys[self._rank],
            first_chunk=task.first_chunk,
            block_ids=task.block_ids,
            start_token=task.start_token,
            end_token=task.end_token,
            prompt_tokens=task.prompt_tokens,
            lease_id=task.lease_id,
            lease_keys=task.lease_keys.get(self._rank, []),
        )

    def _fail_load(self, job: LoadJob, chunk: int, from_token: int, why: str) -> None:
        """Blocks of ``job`` from ``from_token`` on are recomputed by vLLM; the scheduler is told
        (through the aggregated worker output) that the request's load failed at ``chunk``, and why."""
        bs = self._block_size
        self._failed_blocks.update(job.block_ids[(from_token - job.start_token) // bs :])
        if job.req_id not in self._step_failed or chunk < self._step_failed[job.req_id]:
            self._step_failed[job.req_id], self._step_why[job.req_id] = chunk, why
        metrics.STATS.add("load_failed_tokens", job.end_token - from_token)

    def _loaded(self, result: LoadResult) -> None:
        """Account for a finished load (main thread): failed blocks, metrics, one log line with
        the request's miss reasons (the scheduler's, and this load's failure)."""
        job = result.job
        misses = dict(self._misses.pop(job.req_id, None) or {})
        failed = ""
        if result.failed_chunk is not None:
            why = result.failed_why or "internal"
            self._fail_load(job, result.failed_chunk, result.failed_from_token, why)
            lost = miss_reasons.failed_load(job.start_token, job.end_token, result.failed_from_token, why)
            for key, n in lost.items():
                misses[key] = misses.get(key, 0) + n
            failed = f"; {sum(lost.values())} tokens failed ({', '.join(lost)}), recomputing" if lost else ""
        metrics.STATS.add("loaded_tokens", result.ok_tokens)
        metrics.STATS.observe("load_seconds", result.seconds)
        missed = miss_reasons.describe(misses)
        log.info(
            "Retrieved %d of %d tokens (%d chunks) from %s in %.1f ms%s%s",
            result.ok_tokens, job.prompt_tokens, result.ok_chunks, self._pool.name, 1000 * result.seconds,
            failed, f"; {missed}" if missed else "",
        )  # fmt: skip

    def bind_connector_metadata(self, meta: Any) -> None:
        if isinstance(meta, KVPoolMetadata) and meta.fence and self._saver:
            self._saver.fence()  # before this step's forward pass may write a preempted request's blocks

    def start_load_kv(self, meta: Any) -> None:
        if not isinstance(meta, KVPoolMetadata) or not meta.loads:
            return
        in_step: list[LoadJob] = []
        for task in meta.loads:
            job = self._job(task)
            self._misses[task.req_id] = task.misses
            if self._loader is None:  # cannot happen once the scheduler heard this worker; stay safe
                result = LoadResult(job, 0, 0, job.first_chunk, job.start_token, 0.0, "internal")
                if job.lease_id and job.lease_keys:
                    self._pool.release(job.lease_id, job.lease_keys)
                if task.background:
                    self._unloaded.append(result)
                else:
                    self._loaded(result)
            elif task.background:
                self._loader.submit(job)
            else:
                in_step.append(job)
        if in_step:
            self._load_in_step(in_step)

    def _load_in_step(self, jobs: list[LoadJob]) -> None:
        """Loads this step's forward pass reads: all layers now, or layer by layer just before each
        layer's attention (on a GPU: on a side stream, the compute stream waiting per layer).
        Layer by layer holds every chunk of the step until its last layer is copied, so loads larger
        than the loader's two windows go all layers now, window by window (bounded memory)."""
        self._load_started = time.perf_counter()
        if not self.settings.layerwise or not self._loader.fits_prepare(jobs):
            for job in jobs:
                self._loaded(self._loader.run(job))
            return
        self._prepared = [self._loader.prepare(job) for job in jobs]
        layers = len(self._layers)
        self._pending_layers = set(range(layers))
        if self._loader.cache.cuda:
            stream = self._loader.side_stream
            stream.wait_stream(torch.cuda.current_stream(self._loader.cache.device))
            try:
                with torch.cuda.stream(stream):
                    for i in range(layers):
                        for prepared in self._prepared:
                            self._loader.scatter_layer(prepared, i)
                        self._layer_events.append(stream.record_event())
            except Exception as exc:  # a device error: every block of this step's loads is recomputed
                log.warning("kvpool: KV copy failed on the device (%s); recomputing", exc)
                metrics.ERRORS.labels(kind=f"device:{type(exc).__name__}").inc()
                self._end_in_step(failed=True)

    def wait_for_layer_load(self, layer_name: str) -> None:
        i = self._layer_index.get(layer_name)
        if i is None or i not in self._pending_layers:
            return
        self._pending_layers.discard(i)
        if self._layer_events:  # CUDA: the side stream copied it; attention waits for that copy
            torch.cuda.current_stream(self._loader.cache.device).wait_event(self._layer_events[i])
        else:
            try:
                for prepared in self._prepared:
                    self._loader.scatter_layer(prepared, i)
            except Exception as exc:
                log.warning("kvpool: KV copy failed (%s); recomputing", exc)
                metrics.ERRORS.labels(kind=f"copy:{type(exc).__name__}").inc()
                self._end_in_step(failed=True)
                return
        if not self._pending_layers and not self._layer_events:
            self._end_in_step(failed=False)

    def _end_in_step(self, failed: bool) -> None:
        """In-step loads whose copies are done (or failed): buffers back, leases, accounting."""
        if self._layer_events:
            try:
                self._layer_events[-1].synchronize()
            except Exception:
                failed = True
        seconds = time.perf_counter() - self._load_started
        for prepared in self._prepared:
            self._loaded(self._loader.finish(prepared, failed, seconds))
        self._prepared = []
        self._pending_layers = set()
        self._layer_events = []

    # -- saves -------------------------------------------------------------------------------------
    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved whole, one step later (the scheduler's SaveTask): one copy per chunk

    def wait_for_save(self, meta: Any) -> None:
        if self._prepared:
            if self._pending_layers:
                # Safety net: some layer never asked for its KV, so the forward ran without it.
                # Report the blocks as failed: vLLM discards this step's output and recomputes.
                log.error("kvpool: %d layers were never loaded; recomputing", len(self._pending_layers))
            self._end_in_step(failed=bool(self._pending_layers))
        if not isinstance(meta, KVPoolMetadata) or self._saver is None:
            return
        for task in meta.saves:
            self._save(task)

    def _save(self, task: SaveTask) -> None:
        """Copy the chunks out now (a side stream on GPUs); the saver thread writes them."""
        per_chunk = self._C // self._block_size
        chunks = [
            (self._spec(key), task.block_ids[j * per_chunk : (j + 1) * per_chunk])
            for j, key in enumerate(task.keys[self._rank])
        ]
        self._saver.save(task.req_id, chunks)

    # -- what goes back to the scheduler -------------------------------------------------------------
    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def build_worker_meta(self, meta: Any) -> KVPoolWorkerMeta:
        step = meta.step if isinstance(meta, KVPoolMetadata) else 0
        failed, self._step_failed = self._step_failed, {}
        why, self._step_why = self._step_why, {}
        return KVPoolWorkerMeta(step=step, failed=failed, why=why)

    def get_finished(self, meta: Any) -> tuple[set[str] | None, set[str] | None]:
        """Background loads that ended (loaded or failed: their failed blocks and chunks go out in
        this same step's output), and finished requests whose blocks nothing copies out of any
        more."""
        done, self._unloaded = self._unloaded, []
        if self._loader is not None and self._loader.pending:
            idle = isinstance(meta, KVPoolMetadata) and meta.idle
            done += self._loader.take_finished(IDLE_WAIT_S if idle else 0.0)
        for result in done:
            self._loaded(result)
        if isinstance(meta, KVPoolMetadata):
            self._releasing.update(meta.released)
        released = {r for r in self._releasing if self._saver is None or self._saver.copied(r)}
        self._releasing -= released
        return released or None, {r.job.req_id for r in done} or None

    def shutdown(self, flush_s: float) -> None:
        """The worker owns the embedded pool: closing it flushes its disk tier for the next start."""
        if self._loader is not None:
            self._loader.close()
        if self._saver is not None:
            self._saver.close(flush_s, why="engine shutdown")
            shutdown.unregister(self._saver)
        self._pool.close(flush_s)
