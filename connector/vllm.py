"""KVPoolConnector: vLLM engines reuse each other's prefill through a kvpool pool.

Use with ``--kv-transfer-config '{"kv_connector":"KVPoolConnector",
"kv_connector_module_path":"kvpool.connector.vllm","kv_role":"kv_both"}'`` (docs/connector.md).

Scheduler side (engine core): a request's prompt → chained chunk keys (keys.py) → one batched
``prefix_hits`` → the longest run of full chunks the pool holds, always leaving at least one prompt
token for vLLM to compute. Worker side: one batched ``get_many`` per step, every chunk verified
(chunkfmt.py) before it touches the paged cache, scattered layer by layer just before each layer's
attention; newly computed full chunks are gathered after the forward and stored.

The one rule above all others: the cache never changes an answer and never fails a request. A
chunk that is missing, late, corrupt or from another model is a miss; blocks it should have filled
are reported through vLLM's load-failure path (policy "recompute"), so vLLM recomputes them.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from . import chunkfmt, metrics
from .backend import SafePool, open_pool
from .keys import ModelFingerprint, chunk_keys
from .paged import LAYOUTS, PagedLayout, kernel_block_ids
from .settings import ConnectorSettings, load_settings

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("kvpool")
if not log.handlers and not logging.getLogger().handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvpool] %(message)s", "%m-%d %H:%M:%S"))
    log.addHandler(_h)
    log.setLevel(os.environ.get("KVPOOL_LOG_LEVEL", "INFO").upper())
    log.propagate = False


# -- metadata: scheduler → workers, once per step (pickled; plain fields only) ----------------------
@dataclass
class LoadTask:
    req_id: str
    keys: dict[int, list[bytes]]  # worker rank → keys of chunks [first_chunk, first_chunk + n)
    first_chunk: int
    block_ids: list[int]  # manager blocks covering tokens [start_token, end_token)
    start_token: int  # block-aligned; > first_chunk*C when vLLM already had a local prefix
    end_token: int
    prompt_tokens: int


@dataclass
class SaveTask:
    req_id: str
    keys: dict[int, list[bytes]]
    first_chunk: int
    block_ids: list[int]  # manager blocks covering the chunks, in order


@dataclass
class KVPoolMetadata(KVConnectorMetadata):
    loads: list[LoadTask] = field(default_factory=list)
    saves: list[SaveTask] = field(default_factory=list)


@dataclass
class _ReqState:
    keys: dict[int, list[bytes]]  # rank → keys of every full prompt chunk
    prompt_tokens: int
    pool_chunks: int = 0  # leading chunks the pool held at the last lookup
    load: tuple[int, int] | None = None  # token range to load this step
    saved_upto: int = 0  # chunks [0, saved_upto) are in the pool or were stored
    counted: bool = False


def fingerprint_for(vllm_config: VllmConfig, settings: ConnectorSettings, tp_rank: int, pp_rank: int):
    """The model fingerprint both roles compute identically from the config alone."""
    from vllm.platforms import current_platform

    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    kv_dtype = cc.cache_dtype if cc.cache_dtype != "auto" else str(mc.dtype).removeprefix("torch.")
    return ModelFingerprint(
        model=settings.model_id or str(mc.model),
        revision=str(mc.revision or ""),
        kv_dtype=str(kv_dtype),
        kv_layout=f"LKTHD/{current_platform.device_type}",
        num_layers=int(mc.get_num_layers(pc)),
        num_kv_heads=int(mc.get_num_kv_heads(pc)),
        head_dim=int(mc.get_head_size()),
        chunk_size=settings.chunk_size,
        tp_rank=tp_rank,
        tp_size=pc.tensor_parallel_size,
        pp_rank=pp_rank,
        pp_size=pc.pipeline_parallel_size,
    )


class KVPoolConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.settings = load_settings(self._kv_transfer_config.kv_connector_extra_config)
        s = self.settings
        pc = vllm_config.parallel_config
        self._tp, self._pp = pc.tensor_parallel_size, pc.pipeline_parallel_size
        self._block_size = vllm_config.cache_config.block_size
        self._C = s.chunk_size
        self._enabled = True
        if self._C % self._block_size:
            log.error(
                "kvpool: chunk_size %d is not a multiple of block_size %d; cache disabled",
                self._C,
                self._block_size,
            )
            self._enabled = False
        if kv_cache_config is not None and len(kv_cache_config.kv_cache_groups) != 1:
            log.warning("kvpool: models with several KV cache groups are not supported yet; cache disabled")
            self._enabled = False
        self._pool: SafePool = open_pool(
            s.url,
            memory_bytes=s.memory,
            disk_dir=s.disk_dir,
            disk_bytes=s.disk_size,
            timeout_s=s.timeout_ms / 1000,
            engine_id=str(self._kv_transfer_config.engine_id or "default"),
            owner=role == KVConnectorRole.WORKER,
        )
        if not s.url and self._tp * self._pp > 1:
            log.warning("kvpool: the embedded pool is per process; with TP/PP > 1 set KVPOOL_URL (kvpool up)")
        # scheduler side
        self._reqs: dict[str, _ReqState] = {}
        self._fps = [fingerprint_for(vllm_config, s, t, p) for p in range(self._pp) for t in range(self._tp)]
        # worker side
        self._kv: dict[str, torch.Tensor] = {}
        self._layers: list[str] = []
        self._layer_index: dict[str, int] = {}
        self._layout: PagedLayout | None = None
        self._rank = 0
        self._fp: ModelFingerprint | None = None
        self._ratio = 1
        self._pending: list[tuple[LoadTask, torch.Tensor, int, torch.Tensor]] = []  # task, data, layer?, ids
        self._pending_layers: set[int] = set()
        self._pending_log: list[tuple[LoadTask, int, int, float]] = []
        self._failed_blocks: set[int] = set()
        if role == KVConnectorRole.SCHEDULER and s.load_failure_policy == "recompute":
            # vLLM's default is to FAIL a request whose KV load failed; a cache must not do that.
            # The scheduler reads this right after constructing its connector.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        log.info(
            "KVPoolConnector (%s) on %s: chunk %d tokens, block %d, load=%s save=%s",
            role.name.lower(), self._pool.name, self._C, self._block_size, s.load, s.save,
        )  # fmt: skip

    # vLLM asks whether a dropped save must be redelivered: no, it is just a future miss.
    @property
    def requires_kv_delivery(self) -> bool:
        return False

    # ================================ scheduler side ================================
    def _state(self, request: Request) -> _ReqState:
        st = self._reqs.get(request.request_id)
        if st is None:
            tokens = list(request.prompt_token_ids or [])
            salt = getattr(request, "cache_salt", None)
            keys = {r: chunk_keys(fp, tokens, salt=salt) for r, fp in enumerate(self._fps)}
            st = self._reqs[request.request_id] = _ReqState(keys=keys, prompt_tokens=len(tokens))
        return st

    def _interleaved(self, st: _ReqState, n: int) -> list[bytes]:
        """Chunk-major keys of every rank: a chunk counts only if every rank's shard is there."""
        return [st.keys[r][i] for i in range(n) for r in range(len(self._fps))]

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self._enabled:
            return 0, False
        st = self._state(request)
        n_full = len(st.keys[0])
        if n_full and (self.settings.load or self.settings.save):
            t0 = time.perf_counter()
            hits = self._pool.prefix_hits(self._interleaved(st, n_full)) // len(self._fps)
            metrics.STATS.observe("lookup_seconds", time.perf_counter() - t0)
            st.pool_chunks = hits
            st.saved_upto = max(st.saved_upto, hits)
        # Load as far as the pool goes, but leave at least one prompt token for vLLM to compute
        # (it needs one to produce logits): the last chunk may be loaded up to a block boundary.
        bs = self._block_size
        limit = (st.prompt_tokens - 1) // bs * bs
        hit_tokens = min(st.pool_chunks * self._C, limit) if self.settings.load else 0
        if not st.counted:
            st.counted = True
            metrics.STATS.add("requests")
            metrics.STATS.add("requested_tokens", st.prompt_tokens)
            metrics.STATS.add("hit_tokens", hit_tokens)
        if hit_tokens <= num_computed_tokens:
            st.load = None
            return 0, False
        st.load = (num_computed_tokens, hit_tokens)
        return hit_tokens - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens > 0 and st.load is not None:
            end = st.load[1]
            st.load = (end - num_external_tokens, end)
        else:
            st.load = None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVPoolMetadata()
        if not self._enabled or self._kv_cache_manager is None:
            return meta
        computed: dict[str, int] = {
            r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs
        }
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=False))
        bs = self._block_size
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            st = self._reqs.get(req_id)
            if st is None or req_id not in computed:
                continue
            block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
            if st.load is not None:
                start, end = st.load
                first = start // self._C
                last = -(-end // self._C)  # the last chunk may be loaded in part
                meta.loads.append(
                    LoadTask(
                        req_id=req_id,
                        keys={r: k[first:last] for r, k in st.keys.items()},
                        first_chunk=first,
                        block_ids=list(block_ids[start // bs : end // bs]),
                        start_token=start,
                        end_token=end,
                        prompt_tokens=st.prompt_tokens,
                    )
                )
                st.load = None
            if not self.settings.save:
                continue
            done = min(len(st.keys[0]), (computed[req_id] + n_sched) // self._C)
            first = st.saved_upto
            if done > first:
                meta.saves.append(
                    SaveTask(
                        req_id=req_id,
                        keys={r: k[first:done] for r, k in st.keys.items()},
                        first_chunk=first,
                        block_ids=list(block_ids[first * self._C // bs : done * self._C // bs]),
                    )
                )
                st.saved_upto = done
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._reqs.pop(request.request_id, None)
        return False, None

    # ================================ worker side ================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        self._kv = dict(kv_caches)
        self._layers = sorted(self._kv, key=extract_layer_index)
        self._layer_index = {n: i for i, n in enumerate(self._layers)}
        try:
            tp_rank, pp_rank = get_tp_group().rank_in_group, get_pp_group().rank_in_group
        except Exception:
            tp_rank = pp_rank = 0
        self._rank = pp_rank * self._tp + tp_rank
        self._fp = self._fps[self._rank]
        first = self._kv[self._layers[0]]
        kind = "cpu" if current_platform.is_cpu() else "flash"
        backend = self._backend_name(self._layers[0])
        if kind == "flash" and backend not in (None, "FLASH_ATTN"):
            log.warning("kvpool: attention backend %s is not supported yet; cache disabled", backend)
            self._enabled = False
        self._layout = LAYOUTS[kind]()
        _b, h, n, c = first.shape
        self._ratio = self._block_size // n
        dtype = str(first.dtype).removeprefix("torch.")
        if (
            dtype not in chunkfmt.DTYPES
            or h != self._fp.num_kv_heads
            or c != 2 * self._fp.head_dim
            or self._block_size % n
        ):
            log.warning("kvpool: unexpected KV cache view %s %s; cache disabled", tuple(first.shape), dtype)
            self._enabled = False
        self._dtype = dtype
        self._chunk_shape = (len(self._layers), 2, self._C, h, c // 2)
        log.info(
            "kvpool: %d KV layers registered, view %s %s, layout %s (backend %s), rank %d",
            len(self._layers), tuple(first.shape), dtype, kind, backend, self._rank,
        )  # fmt: skip

    def _backend_name(self, layer: str) -> str | None:
        try:
            ctx = self._vllm_config.compilation_config.static_forward_context
            return ctx[layer].get_attn_backend().get_name()
        except Exception:
            return None

    def _spec(self, key: bytes) -> chunkfmt.ChunkSpec:
        return chunkfmt.ChunkSpec(
            key=key,
            fingerprint=self._fp.digest,
            dtype=self._dtype,
            shape=self._chunk_shape,
            token_count=self._C,
        )

    def _ids(self, block_ids: list[int], device) -> torch.Tensor:
        return torch.tensor(kernel_block_ids(block_ids, self._ratio), dtype=torch.long, device=device)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVPoolMetadata) or not meta.loads or not self._enabled:
            if isinstance(meta, KVPoolMetadata):  # cache disabled after scheduling: recompute
                for task in meta.loads:
                    self._failed_blocks.update(task.block_ids)
            return
        t0 = time.perf_counter()
        keys = [k for task in meta.loads for k in task.keys[self._rank]]
        values = self._pool.get_many(keys)
        fetch_s = time.perf_counter() - t0
        device = self._kv[self._layers[0]].device
        bs, pos = self._block_size, 0
        for task in meta.loads:
            task_keys = task.keys[self._rank]
            ok_tokens = ok_chunks = 0
            for j, key in enumerate(task_keys):
                value = values[pos + j]
                chunk_start = (task.first_chunk + j) * self._C
                lo = max(chunk_start, task.start_token)  # block-aligned
                hi = min(chunk_start + self._C, task.end_token)
                payload = self._verify(key, value)
                if payload is None:
                    # this chunk and everything after it in the request: vLLM recomputes them
                    failed = task.block_ids[(lo - task.start_token) // bs :]
                    self._failed_blocks.update(failed)
                    metrics.STATS.add("load_failed_tokens", task.end_token - lo)
                    break
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # read-only buffer; we never write to it
                    data = torch.frombuffer(payload, dtype=getattr(torch, self._dtype)).view(
                        self._chunk_shape
                    )
                data = data[:, :, lo - chunk_start : hi - chunk_start]
                if device.type != "cpu":
                    data = data.to(device, non_blocking=True)
                ids = self._ids(
                    task.block_ids[(lo - task.start_token) // bs : (hi - task.start_token) // bs], device
                )
                self._pending.append((task, data, 0, ids))
                ok_tokens += hi - lo
                ok_chunks += 1
            pos += len(task_keys)
            metrics.STATS.add("loaded_tokens", ok_tokens)
            self._pending_log.append((task, ok_tokens, ok_chunks, fetch_s))
        self._load_t0 = t0
        self._scatter_s = 0.0
        self._pending_layers = set(range(len(self._layers)))
        if not self.settings.layerwise:
            for name in self._layers:
                self.wait_for_layer_load(name)

    def _verify(self, key: bytes, value) -> memoryview | None:
        if value is None:
            return None
        try:
            return chunkfmt.decode(value, self._spec(key))
        except chunkfmt.ChunkFormatError as exc:
            metrics.STATS.add("corrupt_chunks")
            metrics.ERRORS.labels(kind="corrupt_chunk").inc()
            log.warning("kvpool: rejected chunk %s… (%s); deleting it, recomputing", key.hex()[:12], exc)
            self._pool.delete([key])
            return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        i = self._layer_index.get(layer_name)
        if i is None or i not in self._pending_layers:
            return
        t0 = time.perf_counter()
        kv = self._kv[layer_name]
        for _task, data, _, ids in self._pending:
            self._layout.scatter(kv, ids, data[i])
        self._pending_layers.discard(i)
        self._scatter_s += time.perf_counter() - t0
        if not self._pending_layers:
            self._finish_load()

    def _finish_load(self) -> None:
        scatter_s = self._scatter_s
        for task, ok_tokens, n_chunks, fetch_s in self._pending_log:
            ms = 1000 * (fetch_s + scatter_s)
            metrics.STATS.observe("load_seconds", fetch_s + scatter_s)
            total = task.end_token - task.start_token
            log.info(
                "Retrieved %d of %d tokens (%d chunks) from %s in %.1f ms%s",
                ok_tokens, task.prompt_tokens, n_chunks,
                self._pool.name, ms, "" if ok_tokens == total else f"; {total - ok_tokens} tokens failed, recomputing",
            )  # fmt: skip
        self._pending.clear()
        self._pending_log.clear()

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved whole after the forward (wait_for_save): one copy per chunk, all layers

    def wait_for_save(self):
        if self._pending_layers:
            # Safety net: some layer never asked for its KV, so the forward ran without it.
            # Report the blocks as failed: vLLM discards this step's output and recomputes.
            log.error("kvpool: %d layers were never loaded; recomputing", len(self._pending_layers))
            for task, _data, _, _ids in self._pending:
                self._failed_blocks.update(task.block_ids)
            self._pending_layers.clear()
            self._pending.clear()
            self._pending_log.clear()
        meta = self._connector_metadata
        if not isinstance(meta, KVPoolMetadata) or not meta.saves or not self._enabled:
            return
        for task in meta.saves:
            t0 = time.perf_counter()
            items = []
            per_chunk = self._C // self._block_size
            for j, key in enumerate(task.keys[self._rank]):
                blocks = task.block_ids[j * per_chunk : (j + 1) * per_chunk]
                ids = self._ids(blocks, self._kv[self._layers[0]].device)
                chunk = torch.stack([self._layout.gather(self._kv[n], ids) for n in self._layers])
                raw = chunk.cpu().contiguous().view(torch.uint8).numpy()
                items.append((key, chunkfmt.encode(self._spec(key), raw)))
            if self._pool.put_many(items):
                dt = time.perf_counter() - t0
                metrics.STATS.observe("store_seconds", dt)
                metrics.STATS.add("stored_tokens", len(items) * self._C)
                log.info(
                    "Stored %d tokens (%d chunk%s) to %s in %.1f ms",
                    len(items) * self._C, len(items), "" if len(items) == 1 else "s", self._pool.name, 1000 * dt,
                )  # fmt: skip

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def get_kv_connector_stats(self):
        from .vllm_metrics import KVPoolConnectorStats

        data = metrics.STATS.take()
        return KVPoolConnectorStats(data=data) if data else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from .vllm_metrics import KVPoolConnectorStats

        return KVPoolConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from .vllm_metrics import KVPoolPromMetrics

        return KVPoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        # The worker owns the embedded pool: close it so its disk tier is flushed for the next start.
        if self.role == KVConnectorRole.WORKER:
            self._pool.close()
        else:
            self._pool.flush()
