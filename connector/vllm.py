"""KVPoolConnector: vLLM engines reuse each other's prefill through a kvpool pool.

Use with ``--kv-transfer-config '{"kv_connector":"KVPoolConnector",
"kv_connector_module_path":"kvpool.connector.vllm","kv_role":"kv_both"}'`` (docs/connector.md).

A facade: vLLM makes one connector per role, and this one forwards each call to the side that
role runs, the scheduler side (scheduler.py, in the engine core: lookups, what to load and store,
when blocks may be freed) or the worker side (worker.py, in each worker: the copies). The two
share nothing but the metadata vLLM carries between them (metadata.py).

The one rule above all others: the cache never changes an answer and never fails a request. A
chunk that is missing, late, corrupt or from another model, or a copy that fails, is a miss whose
blocks vLLM recomputes (policy "recompute"); nothing computed over a failed load is stored; an
engine, worker or request the connector cannot serve exactly is refused with one log line.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.logger import init_logger

from kvpool.cachenode.core.settings import load_settings, loads_async

from . import shutdown
from .backend import SafePool, open_pool
from .eligibility import engine_refusals
from .engine_config import engine_shape, fingerprint_for
from .scheduler import ConnectorScheduler
from .worker import ConnectorWorker, worker_ranks

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = init_logger(__name__)
_package_log = logging.getLogger("kvpool")
"""Every kvpool module logs under it (`__name__`); given no logging setup, the connector's lines
reach the engine's stderr through this handler."""
if not _package_log.handlers and not logging.getLogger().handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvpool] %(message)s", "%m-%d %H:%M:%S"))
    _package_log.addHandler(_h)
    _package_log.setLevel(os.environ.get("KVPOOL_LOG_LEVEL", "INFO").upper())
    _package_log.propagate = False


class KVPoolConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None
    ):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.settings = s = load_settings(
            self._kv_transfer_config.kv_connector_extra_config, kv_role=self._kv_transfer_config.kv_role
        )
        pc, block_size = vllm_config.parallel_config, vllm_config.cache_config.block_size
        refusals = engine_refusals(engine_shape(vllm_config, kv_cache_config, s))
        tp_rank = pp_rank = None
        if role == KVConnectorRole.WORKER:
            tp_rank, pp_rank, unknown = worker_ranks()
            refusals += [unknown] if unknown else []
        dp_rank = int(getattr(pc, "data_parallel_index", pc.data_parallel_rank) or 0)
        engine_id = str(self._kv_transfer_config.engine_id or "default")
        pool = SafePool(None) if refusals else open_pool(
            s.url, memory_bytes=s.memory, disk_dir=s.disk_dir, disk_bytes=s.disk_size, timeout_s=s.timeout_ms / 1000,
            engine_id=engine_id, owner=(tp_rank, pp_rank) == (0, 0), dp_rank=dp_rank, settings=s,
        )  # fmt: skip
        self.scheduler: ConnectorScheduler | None = None
        self.worker: ConnectorWorker | None = None
        if role == KVConnectorRole.WORKER:
            self.worker = ConnectorWorker(
                vllm_config, s, pool, tp_rank=tp_rank, pp_rank=pp_rank, refusals=list(refusals)
            )
        else:
            self.scheduler = ConnectorScheduler(
                s, pool, tp=pc.tensor_parallel_size, pp=pc.pipeline_parallel_size, block_size=block_size,
                fingerprint=functools.partial(fingerprint_for, vllm_config, s), refusals=refusals,
                consumer=self._kv_transfer_config.kv_role == "kv_consumer",
            )  # fmt: skip
            if s.load_failure_policy == "recompute":
                # vLLM's default is to FAIL a request whose KV load failed; a cache must not do that.
                # The scheduler reads this right after constructing its connector.
                self._kv_transfer_config.kv_load_failure_policy = "recompute"
        if refusals:
            log.warning("kvpool: cache off for this engine: %s", "; ".join(refusals))
        if self.scheduler is not None and s.save and not refusals:
            shutdown.note_kill_deadline(
                float(getattr(vllm_config, "shutdown_timeout", 0) or 0), s.shutdown_flush_ms
            )
        log.info(
            "KVPoolConnector (%s) on %s: chunk %d tokens, block %d, load=%s save=%s",
            role.name.lower(), pool.name, s.chunk_size, block_size, s.load, s.save,
        )  # fmt: skip

    # vLLM asks whether a dropped save must be redelivered: no, it is just a future miss.
    @property
    def requires_kv_delivery(self) -> bool:
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """In-step loads scatter layer i from inside the forward pass (``wait_for_layer_load``),
        which a captured CUDA graph would skip: vLLM must then run graphs piecewise. Background
        loads and saves happen outside the forward pass."""
        try:
            s = load_settings(extra_config)
        except ValueError:
            return True  # the connector will refuse these settings; do not capture around it
        return s.load and s.layerwise and not loads_async(s)

    # ================================ scheduler side ================================
    def set_xfer_handshake_metadata_pp_aware(
        self, metadata: dict[tuple[int, int], KVConnectorHandshakeMetadata]
    ) -> None:
        self.scheduler.set_worker_reports(metadata)

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        self.scheduler.set_worker_reports({(0, tp): m for tp, m in metadata.items()})

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.bind_kv_cache_manager(kv_cache_manager)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        self.scheduler.update_state_after_alloc(request, num_external_tokens)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self.scheduler.update_connector_output(connector_output)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request)

    # ================================ worker side ================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self.worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self.worker.report

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self.worker.bind_connector_metadata(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_load_kv(self._connector_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        self.worker.save_kv_layer(layer_name, kv_layer, attn_metadata, **kwargs)

    def wait_for_save(self):
        self.worker.wait_for_save(self._connector_metadata)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.build_worker_meta(self._connector_metadata)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished(self._connector_metadata)

    # ================================ both ================================
    def get_kv_connector_stats(self):
        from .vllm_metrics import take_stats

        return take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from .vllm_metrics import KVPoolConnectorStats

        return KVPoolConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from .vllm_metrics import KVPoolPromMetrics

        return KVPoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self):
        flush_s = self.settings.shutdown_flush_ms / 1000
        if self.worker is not None:
            self.worker.shutdown(flush_s)
        if self.scheduler is not None:
            self.scheduler.shutdown(flush_s)
