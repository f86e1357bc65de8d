"""KVPoolConnector: vLLM engines reuse each other's prefill through a kvpool pool.

Use with ``--kv-transfer-config '{"kv_connector":"KVPoolConnector",
"kv_connector_module_path":"kvpool.connector.vllm","kv_role":"kv_both"}'`` (docs/connector.md).

Scheduler side (engine core): a request's prompt → chained chunk keys (keys.py) that carry every
other input that changes the KV — LoRA adapter, multimodal inputs, prompt embeddings, tenant salt
(request_keys.py) → one batched lookup that pins what it found (a lease), run in the background so
that a slow pool never holds up a scheduling step (the answer is cached per request; until it is
known vLLM is told to ask again) → the longest run of full chunks the pool holds, always leaving at
least one prompt token for vLLM to compute. Worker side (transfer.py): chunks are received straight
into pooled host buffers, verified (chunkfmt.py) before they touch the paged cache and scattered
with all layers per call. From a remote pool they load in the background while the engine computes
other requests (vLLM's load-async path: the request waits in ``WAITING_FOR_REMOTE_KVS`` until every
worker reported it in ``get_finished``); from the embedded pool inside the step, layer by layer.
Newly computed chunks are copied out to host buffers and written by a background thread.

The one rule above all others: the cache never changes an answer and never fails a request.

* A chunk that is missing, late, corrupt or from another model, or a copy that fails on the
  device, is a miss; the blocks it should have filled are reported through vLLM's load-failure
  path (policy "recompute"), in the same worker output that reports the load finished.
* Nothing computed over a failed load is stored: a chunk is saved only one step after it was
  computed, once the scheduler has seen that step's aggregated output of *every* worker (TP and PP
  ranks alike) report no load failure for the request. The saved-progress marker advances only
  then; a failure moves it back to the first failed chunk, so the recomputed chunks are stored.
* An engine or worker the connector cannot copy exactly (eligibility.py) is refused before the
  first lookup, and a request it cannot key safely is neither loaded nor stored; each says why in
  one log line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import blake3
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from . import chunkfmt, kvcopy, metrics, model_identity, shutdown
from .backend import SafePool, open_pool
from .eligibility import EngineShape, WorkerView, engine_refusals, worker_layout
from .keys import ModelFingerprint, chunk_keys
from .paged import LAYOUTS
from .request_keys import AdapterDigests, key_inputs
from .settings import ConnectorSettings, load_settings, loads_async
from .transfer import Loader, LoadJob, LoadResult, PagedCache, Prepared, Saver

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)
_package_log = logging.getLogger("kvpool")
"""Every kvpool module logs under it (`__name__`); given no logging setup, the connector's lines
reach the engine's stderr through this handler."""
if not _package_log.handlers and not logging.getLogger().handlers:
    _h = logging.StreamHandler()
    _h.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [kvpool] %(message)s", "%m-%d %H:%M:%S"))
    _package_log.addHandler(_h)
    _package_log.setLevel(os.environ.get("KVPOOL_LOG_LEVEL", "INFO").upper())
    _package_log.propagate = False

LEASE_REUSE_MARGIN_S = 1.0  # a lookup's lease is reused while it has at least this long to live
IDLE_WAIT_S = 0.005  # a step with nothing to compute waits this long for a background load to end


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
    lease_id: int = 0  # the lookup's lease: each worker releases its keys once it has read them
    lease_keys: dict[int, list[bytes]] = field(default_factory=dict)
    background: bool = False  # load-async: the request waits until every worker reports it done


@dataclass
class SaveTask:
    req_id: str
    keys: dict[int, list[bytes]]
    first_chunk: int
    block_ids: list[int]  # manager blocks covering the chunks, in order


@dataclass
class KVPoolMetadata(KVConnectorMetadata):
    step: int = 0
    loads: list[LoadTask] = field(default_factory=list)
    saves: list[SaveTask] = field(default_factory=list)
    # finished requests whose blocks vLLM kept for a save: each worker reports them done once its
    # copies out of their blocks have finished
    released: list[str] = field(default_factory=list)
    idle: bool = False  # nothing is computed this step
    fence: bool = False  # blocks are freed early (preemption): copies out must finish first


# -- workers → scheduler ----------------------------------------------------------------------------
@dataclass
class KVPoolWorkerMeta(KVConnectorWorkerMetadata):
    """One step's load outcome; vLLM aggregates it over every worker (all TP and PP ranks) before the
    scheduler sees it, so one rank's failure is every rank's failure."""

    step: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # request → first chunk that failed

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVPoolWorkerMeta):
            self.step = max(self.step, other.step)
            for req, chunk in other.failed.items():
                self.failed[req] = min(chunk, self.failed.get(req, chunk))
        return self


@dataclass
class WorkerReport(KVConnectorHandshakeMetadata):
    """What a worker found when vLLM registered its KV cache (sent once, through the handshake)."""

    tp_rank: int | None
    pp_rank: int | None
    refusals: list[str]
    backend: str = ""
    layout: str = ""
    view_dtype: str = ""
    kv_quant: str = ""
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    # the model's identity by content and what computes its KV (model_identity.py): a value for
    # each of ModelFingerprint.IDENTITY_FIELDS; no "weights" → the scheduler keeps the cache off
    identity: dict[str, str] = field(default_factory=dict)


@dataclass
class _ReqState:
    # rank → keys of every full prompt chunk; None until the first lookup (in a lookup thread,
    # off the scheduler's) has hashed them
    keys: dict[int, list[bytes]] | None
    prompt_tokens: int
    refused: str | None = None
    pool_chunks: int = 0  # leading chunks the pool held at the last lookup
    # the first chunk whose load failed: never loaded again for this request, and no lookup goes
    # past it (a fresh lookup would find the same chunk and the request would load it forever)
    load_limit: int | None = None
    pinned: int = 0  # interleaved keys the lookup's lease pinned
    lease: tuple[int, float] | None = None  # (lease id, local expiry) of the last lookup
    lookup: Future | None = None  # a lookup not yet answered
    load: tuple[int, int] | None = None  # token range to load this step
    saved_upto: int = 0  # chunks [0, saved_upto) are in the pool or were sent to be stored
    confirmed_upto: int = 0  # chunks computed in steps whose outputs showed no failed load
    recorded_upto: int = 0  # chunks computed by a scheduled step (confirmed or not)
    pending: deque[tuple[int, int]] = field(default_factory=deque)  # (step, chunks up to) unconfirmed
    finished: bool = False  # vLLM finished it and keeps its blocks until we release them
    counted: bool = False
    saving: bool = False  # saves were issued: blocks stay until the workers copied them out
    loading: bool = False  # a background load is in flight (vLLM frees its blocks after it)


def _config_digest(vllm_config: VllmConfig) -> str:
    """The model config as it shapes the KV (rope scaling, overrides, weight quantisation)."""
    mc = vllm_config.model_config
    cfg = getattr(mc, "hf_text_config", None) or mc.hf_config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    for name in ("_name_or_path", "name_or_path", "transformers_version", "_commit_hash"):
        d.pop(name, None)
    d["__quantization__"] = str(getattr(mc, "quantization", None))
    return blake3.blake3(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]


def fingerprint_for(
    vllm_config: VllmConfig, settings: ConnectorSettings, report: WorkerReport
) -> ModelFingerprint:
    """The model fingerprint of one worker, computed identically by the scheduler (from the
    worker's report) and by the worker itself. The model is its weights' digest (the report's),
    never its path; ``model_id`` only adds a name (two names never share)."""
    from vllm.platforms import current_platform

    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    model_dtype = str(mc.dtype).removeprefix("torch.")
    kv_dtype = cc.cache_dtype if cc.cache_dtype != "auto" else model_dtype
    return ModelFingerprint(
        model=settings.model_id or "",
        revision="",  # the weights digest says which revision
        kv_dtype=str(kv_dtype),
        kv_layout=f"LKTHD/{current_platform.device_type}",
        num_layers=report.num_layers,
        num_kv_heads=report.num_kv_heads,
        head_dim=report.head_dim,
        chunk_size=settings.chunk_size,
        tp_rank=int(report.tp_rank or 0),
        tp_size=pc.tensor_parallel_size,
        pp_rank=int(report.pp_rank or 0),
        pp_size=pc.pipeline_parallel_size,
        attn_backend=report.backend,
        kv_quant=report.kv_quant,
        model_dtype=model_dtype,
        config_digest=_config_digest(vllm_config),
        **{name: report.identity.get(name, "") for name in ModelFingerprint.IDENTITY_FIELDS},
    )


def _engine_shape(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, s: ConnectorSettings):
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    groups = [] if kv_cache_config is None else kv_cache_config.kv_cache_groups
    spec = vllm_config.speculative_config
    return EngineShape(
        kv_group_specs=[type(g.kv_cache_spec).__name__ for g in groups] if groups else ["FullAttentionSpec"],
        use_mla=bool(getattr(mc, "use_mla", False)),
        encoder_decoder=bool(getattr(mc, "is_encoder_decoder", False)),
        cache_dtype=str(cc.cache_dtype),
        chunk_size=s.chunk_size,
        block_size=cc.block_size,
        tp=pc.tensor_parallel_size,
        pp=pc.pipeline_parallel_size,
        dcp=int(getattr(pc, "decode_context_parallel_size", 1) or 1),
        pcp=int(getattr(pc, "prefill_context_parallel_size", 1) or 1),
        speculative_method=None if spec is None else str(spec.method),
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
        self._dp_rank = int(getattr(pc, "data_parallel_index", pc.data_parallel_rank) or 0)
        self._block_size = vllm_config.cache_config.block_size
        self._C = s.chunk_size
        self._refusals = engine_refusals(_engine_shape(vllm_config, kv_cache_config, s))
        # worker side: which rank this is; never guessed (a wrong rank would load another shard)
        self._tp_rank: int | None = None
        self._pp_rank: int | None = None
        owner = False
        if role == KVConnectorRole.WORKER:
            try:
                from vllm.distributed.parallel_state import get_pp_group, get_tp_group

                self._tp_rank, self._pp_rank = get_tp_group().rank_in_group, get_pp_group().rank_in_group
            except Exception as exc:
                self._refusals.append(f"the worker's tensor/pipeline-parallel rank is unknown ({exc})")
            owner = (self._tp_rank, self._pp_rank) == (0, 0)
        if self._refusals:
            self._pool = SafePool(None)
        else:
            self._pool = open_pool(
                s.url,
                memory_bytes=s.memory,
                disk_dir=s.disk_dir,
                disk_bytes=s.disk_size,
                timeout_s=s.timeout_ms / 1000,
                engine_id=str(self._kv_transfer_config.engine_id or "default"),
                owner=owner,
                dp_rank=self._dp_rank,
                settings=s,
            )
        # scheduler side: disabled until every worker has reported (set_xfer_handshake_metadata)
        self._enabled = False
        self._async_loads = loads_async(s)
        self._background: list[str] = []  # requests whose background load is sent this step
        self._lookup_pool: ThreadPoolExecutor | None = None
        self._reqs: dict[str, _ReqState] = {}
        self._fps: list[ModelFingerprint] = []  # index = pp_rank * tp + tp_rank
        self._adapters = AdapterDigests()
        self._logged_refusals: set[str] = set()
        self._step = 0
        # worker side
        self._kv: dict[str, torch.Tensor] = {}
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
        if role == KVConnectorRole.SCHEDULER and s.load_failure_policy == "recompute":
            # vLLM's default is to FAIL a request whose KV load failed; a cache must not do that.
            # The scheduler reads this right after constructing its connector.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        if self._refusals:
            log.warning("kvpool: cache off for this engine: %s", "; ".join(self._refusals))
        grace_s = float(getattr(vllm_config, "shutdown_timeout", 0) or 0)
        if (
            role == KVConnectorRole.SCHEDULER
            and s.save
            and not self._refusals
            and grace_s * 1000 < s.shutdown_flush_ms
        ):
            # `vllm serve` stopped by Ctrl-C or SIGTERM kills its engine after --shutdown-timeout
            # seconds: sooner than the saver's flush deadline, chunks still being written are lost
            log.info(
                "kvpool: vLLM's --shutdown-timeout is %g s; a `vllm serve` stopped by Ctrl-C or SIGTERM "
                "kills this engine before the connector can write the chunks it still holds (they are "
                "recomputed later). Run it with --shutdown-timeout %d to let them be written.",
                grace_s, -(-s.shutdown_flush_ms // 1000),
            )  # fmt: skip
        log.info(
            "KVPoolConnector (%s) on %s: chunk %d tokens, block %d, load=%s save=%s",
            role.name.lower(), self._pool.name, self._C, self._block_size, s.load, s.save,
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
        """Every worker's report, keyed (pp_rank, tp_rank): the scheduler turns the cache on only
        when all of them can be served, and keys each rank's chunks with its own fingerprint."""
        reasons = list(self._refusals)
        reports: dict[tuple[int, int], WorkerReport] = {}
        for (pp, tp), report in metadata.items():
            if isinstance(report, WorkerReport):
                reports[(pp, tp)] = report
                reasons += [f"worker tp{tp}/pp{pp}: {r}" for r in report.refusals]
        missing = [(pp, tp) for pp in range(self._pp) for tp in range(self._tp) if (pp, tp) not in reports]
        if missing and not self._refusals:
            reasons.append(f"no report from workers {missing}")
        if not reasons:
            kinds = {(r.backend, r.layout, r.view_dtype, r.kv_quant) for r in reports.values()}
            if len(kinds) > 1:
                reasons.append(f"workers disagree on backend/layout/dtype/quantisation: {sorted(kinds)}")
            unidentified = sorted(
                (tp, pp) for (pp, tp), r in reports.items() if not r.identity.get("weights")
            )
            if unidentified:  # never key chunks by a name alone
                reasons.append(f"workers {unidentified} sent no weights digest")
        if reasons:
            if not self._refusals:
                log.warning("kvpool: cache off for this engine: %s", "; ".join(reasons))
            self._enabled = False
            return
        self._fps = [
            fingerprint_for(self._vllm_config, self.settings, reports[(pp, tp)])
            for pp in range(self._pp)
            for tp in range(self._tp)
        ]
        self._enabled = True
        for fp in self._fps:
            log.info(
                "kvpool: chunk keys of tp%d/pp%d use fingerprint %s %s",
                fp.tp_rank, fp.pp_rank, fp.digest.hex()[:16], json.dumps(asdict(fp), sort_keys=True),
            )  # fmt: skip

    def set_xfer_handshake_metadata(self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        self.set_xfer_handshake_metadata_pp_aware({(0, tp): m for tp, m in metadata.items()})

    def _refuse_once(self, reason: str) -> None:
        metrics.STATS.add("refused_requests")
        if reason not in self._logged_refusals:
            self._logged_refusals.add(reason)
            log.warning("kvpool: not caching requests with %s (neither loaded nor stored)", reason)

    def _state(self, request: Request) -> _ReqState:
        """The request's state; its keys are hashed later, by ``_hash_keys`` in a lookup thread
        (a prompt shorter than a chunk has none to hash)."""
        st = self._reqs.get(request.request_id)
        if st is None:
            n = int(request.num_prompt_tokens)
            st = _ReqState(
                keys=None if n >= self._C else {r: [] for r in range(len(self._fps))}, prompt_tokens=n
            )
            self._reqs[request.request_id] = st
        return st

    def _hash_keys(self, st: _ReqState, request: Request) -> None:
        """Every rank's chunk keys of ``request`` (or why it cannot be keyed). Runs once per
        request, in a lookup thread: reading the prompt, a LoRA adapter's digest (hashed when the
        adapter is first seen) and hashing a long prompt stay off the scheduler thread."""
        inputs = key_inputs(request, self._C, self._adapters)
        if inputs.refused:
            self._refuse_once(inputs.refused)
            st.refused = inputs.refused
            st.keys = {r: [] for r in range(len(self._fps))}
            return
        st.keys = {
            r: chunk_keys(fp, inputs.tokens, salt=inputs.salt, adapter=inputs.adapter, extras=inputs.extras)
            for r, fp in enumerate(self._fps)
        }

    def _interleaved(self, st: _ReqState, n: int) -> list[bytes]:
        """Chunk-major keys of every rank: a chunk counts only if every rank's shard is there."""
        return [st.keys[r][i] for i in range(n) for r in range(len(self._fps))]

    def _lookups(self) -> ThreadPoolExecutor:
        if self._lookup_pool is None:
            self._lookup_pool = ThreadPoolExecutor(2, thread_name_prefix="kvpool-lookup")
        return self._lookup_pool

    def _ask_pool(self, st: _ReqState, request: Request | None, lease_ms: int) -> tuple[int, int, float]:
        """One batched lookup (in a lookup thread): (found, lease id, when it was asked). The
        request's keys are hashed first if they are not yet; the lookup goes no further than the
        request may load (``load_limit``)."""
        if st.keys is None:
            try:
                self._hash_keys(st, request)
            except Exception as exc:  # never fail a request over its keys: neither load nor store
                log.warning(
                    "kvpool: could not key a request (%s: %s); not caching it", type(exc).__name__, exc
                )
                st.refused, st.keys = (
                    f"unkeyable input ({type(exc).__name__})",
                    {r: [] for r in range(len(self._fps))},
                )
        n = len(st.keys[0]) if st.load_limit is None else min(st.load_limit, len(st.keys[0]))
        asked = time.monotonic()
        if st.refused or n == 0:
            return 0, 0, asked
        t0 = time.perf_counter()
        count, lease_id = self._pool.lease_prefix(self._interleaved(st, n), lease_ms)
        metrics.STATS.observe("lookup_seconds", time.perf_counter() - t0)
        return count, lease_id, asked

    def _lookup(self, st: _ReqState, request: Request, computed: int) -> bool:
        """Bring ``st``'s pool answer up to date; False while a lookup is still running after
        ``lookup_wait_ms`` (vLLM then asks again in a later step)."""
        lease_ms = self.settings.lease_ms if self.settings.load else 0
        if st.lookup is None:
            if st.lease is not None and st.lease[1] - LEASE_REUSE_MARGIN_S > time.monotonic():
                return True  # the last lookup's pins still hold: its answer stands
            self._drop_lease(st)
            if st.keys is not None and (
                not st.keys[0] or (st.load_limit is not None and st.load_limit * self._C <= computed)
            ):  # nothing more this request may load (its last load failed there): no lookup at all
                return True  # pool_chunks stays as the failure left it (_roll_back)
            st.lookup = self._lookups().submit(
                self._ask_pool, st, request if st.keys is None else None, lease_ms
            )
        try:
            count, lease_id, asked = st.lookup.result(timeout=self.settings.lookup_wait_ms / 1000)
        except TimeoutError:
            return False
        except Exception:  # cannot happen (SafePool answers misses); stay safe
            count, lease_id, asked = 0, 0, time.monotonic()
        st.lookup = None
        st.pool_chunks, st.pinned = count // len(self._fps), count
        st.lease = (lease_id, asked + lease_ms / 1000) if lease_id else None
        st.saved_upto = max(st.saved_upto, st.pool_chunks)  # in the pool: nothing to store
        st.confirmed_upto = max(st.confirmed_upto, st.saved_upto)
        st.recorded_upto = max(st.recorded_upto, st.confirmed_upto)
        return True

    def _drop_lease(self, st: _ReqState) -> None:
        """The lookup's pins are not going to be read: end them now rather than at expiry (a
        lookup still running ends its pins when it answers)."""
        if st.lookup is not None:
            st.lookup.add_done_callback(self._release_answer)
            st.lookup = None
        if st.lease is not None:
            self._pool.release(st.lease[0])
            st.lease = None

    def _release_answer(self, answer: Future) -> None:
        try:
            _count, lease_id, _asked = answer.result()
        except Exception:
            return
        self._pool.release(lease_id)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not self._enabled:
            return 0, False
        st = self._state(request)
        if st.refused:
            return 0, False
        if (self.settings.load or self.settings.save) and not self._lookup(st, request, num_computed_tokens):
            return None, False  # not known yet: vLLM skips the request this step and asks again
        if st.refused:  # found out while hashing its keys
            return 0, False
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
            self._drop_lease(st)
            return 0, False
        st.load = (num_computed_tokens, hit_tokens)
        return hit_tokens - num_computed_tokens, self._async_loads

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        st = self._reqs.get(request.request_id)
        if st is None:
            return
        if num_external_tokens > 0 and st.load is not None:
            end = st.load[1]
            st.load = (end - num_external_tokens, end)
            if self._async_loads:  # not scheduled until loaded: sent to the workers this step
                self._background.append(request.request_id)
        else:
            st.load = None
            self._drop_lease(st)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        """A step's aggregated worker output: confirm what it computed, or roll back every request
        that loaded or may have read KV that failed to load (nothing it computed on top of that
        is stored). A request whose own load failed never loads from that chunk on again."""
        for req_id in getattr(connector_output, "finished_recving", None) or ():
            st = self._reqs.get(req_id)
            if st is not None:
                st.loading = False
        wm = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(wm, KVPoolWorkerMeta):
            return
        for req_id, chunk in wm.failed.items():
            st = self._reqs.get(req_id)
            if st is not None:
                self._roll_back(st, chunk)
                st.load_limit = chunk if st.load_limit is None else min(st.load_limit, chunk)
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid and self._kv_cache_manager is not None:
            for req_id, chunk in self._readers_of(set(invalid), skip=wm.failed).items():
                self._roll_back(self._reqs[req_id], chunk)
        for st in self._reqs.values():
            while st.pending and st.pending[0][0] <= wm.step:
                st.confirmed_upto = st.pending.popleft()[1]

    def _readers_of(self, invalid: set[int], skip: dict[str, int]) -> dict[str, int]:
        """Requests other than ``skip`` whose blocks include blocks that failed to load, with the
        chunk of the first such block: vLLM shares a block being loaded in a step with every
        same-prefix request of that step (a burst, ``n > 1`` sampling) as soon as it is allocated."""
        readers: dict[str, int] = {}
        for req_id in self._reqs:
            if req_id in skip:
                continue
            try:
                blocks = self._kv_cache_manager.get_block_ids(req_id)[0]
            except Exception:  # freed by vLLM already: nothing of it is stored any more
                continue
            first = next((i for i, b in enumerate(blocks) if b in invalid), None)
            if first is not None:
                readers[req_id] = first * self._block_size // self._C
        return readers

    def _roll_back(self, st: _ReqState, chunk: int) -> None:
        """Chunks from ``chunk`` on, and whatever was computed in steps not yet confirmed, are
        not stored; vLLM recomputes them and they are stored then."""
        metrics.STATS.add("unsaved_tokens", (st.recorded_upto - st.confirmed_upto) * self._C)
        st.pending.clear()
        st.saved_upto = min(st.saved_upto, chunk)
        st.confirmed_upto = min(st.confirmed_upto, chunk)
        st.recorded_upto = st.confirmed_upto
        st.pool_chunks = min(st.pool_chunks, chunk)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        self._step += 1
        meta = KVPoolMetadata(step=self._step, idle=not scheduler_output.total_num_scheduled_tokens)
        if not self._enabled or self._kv_cache_manager is None:
            return meta
        # Preempted requests lost their blocks (maybe to a request of this very step): what they
        # computed but did not save yet is gone; they recompute or reload it later. Copies out of
        # their blocks that may still run must end before this step's forward pass writes them.
        for req_id in scheduler_output.preempted_req_ids or ():
            st = self._reqs.get(req_id)
            if st is not None:
                st.pending.clear()
                st.confirmed_upto = st.recorded_upto = st.saved_upto
                st.load = None
                meta.fence = meta.fence or st.saving
        if self.settings.save:
            self._confirmed_saves(meta)
        for req_id in self._background:  # waiting for their load, not scheduled
            st = self._reqs.get(req_id)
            if st is not None and st.load is not None:
                meta.loads.append(self._load_task(req_id, st, background=True))
                st.loading = True
        self._background.clear()
        computed: dict[str, int] = {
            r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs
        }
        cached = scheduler_output.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=False))
        for req_id, n_sched in scheduler_output.num_scheduled_tokens.items():
            st = self._reqs.get(req_id)
            if st is None or st.keys is None or st.refused or req_id not in computed:
                continue
            if st.load is not None:  # loaded inside this step, before its forward pass
                meta.loads.append(self._load_task(req_id, st, background=False))
            if not self.settings.save:
                continue
            done = min(len(st.keys[0]), (computed[req_id] + n_sched) // self._C)
            if done > st.recorded_upto:
                st.pending.append((self._step, done))
                st.recorded_upto = done
        return meta

    def _load_task(self, req_id: str, st: _ReqState, background: bool) -> LoadTask:
        """The workers' orders for ``st.load``; its lease goes with them (each releases its keys)."""
        bs = self._block_size
        start, end = st.load
        first = start // self._C
        last = -(-end // self._C)  # the last chunk may be loaded in part
        block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
        lease_id, lease_keys = 0, {}
        if st.lease is not None:
            lease_id, st.lease = st.lease[0], None
            n = len(self._fps)  # rank r's chunk i sat at i*n + r of the pinned lookup
            lease_keys = {r: k[: max(0, st.pinned - r + n - 1) // n] for r, k in st.keys.items()}
        st.load = None
        return LoadTask(
            req_id=req_id,
            keys={r: k[first:last] for r, k in st.keys.items()},
            first_chunk=first,
            block_ids=list(block_ids[start // bs : end // bs]),
            start_token=start,
            end_token=end,
            prompt_tokens=st.prompt_tokens,
            lease_id=lease_id,
            lease_keys=lease_keys,
            background=background,
        )

    def _confirmed_saves(self, meta: KVPoolMetadata) -> None:
        """Chunks whose computing step came back clean are stored now (their blocks are still the
        request's: running, or finished with the free delayed for us). Finished requests with
        nothing left to wait for are released."""
        bs = self._block_size
        for req_id, st in list(self._reqs.items()):
            first, done = st.saved_upto, st.confirmed_upto
            if done > first:
                block_ids = self._kv_cache_manager.get_block_ids(req_id)[0]
                meta.saves.append(
                    SaveTask(
                        req_id=req_id,
                        keys={r: k[first:done] for r, k in st.keys.items()},
                        first_chunk=first,
                        block_ids=list(block_ids[first * self._C // bs : done * self._C // bs]),
                    )
                )
                st.saved_upto = done
                st.saving = True
            if st.finished and not st.pending:
                meta.released.append(req_id)
                del self._reqs[req_id]

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        st = self._reqs.get(request.request_id)
        if st is None:
            return False, None
        self._drop_lease(st)
        if st.loading:  # aborted while loading: vLLM itself keeps its blocks until the load ends
            del self._reqs[request.request_id]
            return False, None
        if self._enabled and (st.pending or st.confirmed_upto > st.saved_upto or st.saving):
            # keep the blocks until the confirmed chunks are stored and every copy out of them
            # has finished (on a GPU those run on a side stream)
            st.finished = True
            return True, None
        del self._reqs[request.request_id]
        return False, None

    # ================================ worker side ================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        from vllm.model_executor.models.utils import extract_layer_index
        from vllm.platforms import current_platform

        vc = self._vllm_config
        self._kv = dict(kv_caches)
        self._layers = sorted(self._kv, key=extract_layer_index)
        self._layer_index = {n: i for i, n in enumerate(self._layers)}
        first = self._kv[self._layers[0]]
        backend = self._backend_name(self._layers[0])
        dtype = str(first.dtype).removeprefix("torch.")
        view = WorkerView(
            device=str(current_platform.device_type),
            backend=backend,
            view_shape=tuple(first.shape),
            view_dtype=dtype,
            num_layers=len(self._layers),
            model_layers=int(vc.model_config.get_num_layers(vc.parallel_config)),
            num_kv_heads=int(vc.model_config.get_num_kv_heads(vc.parallel_config)),
            head_dim=int(vc.model_config.get_head_size()),
            block_size=self._block_size,
            noncausal_layers=sum(not self._causal(n) for n in self._layers),
        )
        kind, refusals = worker_layout(view)
        refusals = self._refusals + refusals
        kv_quant = self._kv_quant()
        if kv_quant is None:
            refusals.append("a quantised (fp8) KV cache without known k/v scales on some layer")
        identity, why = self._identity(first.device) if not refusals else ({}, None)
        if why:
            refusals.append(why)
        self._report = WorkerReport(
            tp_rank=self._tp_rank,
            pp_rank=self._pp_rank,
            refusals=refusals,
            backend=backend or "",
            layout=kind or "",
            view_dtype=dtype,
            kv_quant=kv_quant or "",
            num_layers=view.num_layers,
            num_kv_heads=view.num_kv_heads,
            head_dim=view.head_dim,
            identity=identity,
        )
        self._enabled = not refusals
        if not self._enabled:
            log.warning("kvpool: cache off on this worker: %s", "; ".join(refusals))
            return
        self._rank = self._pp_rank * self._tp + self._tp_rank
        self._fp = fingerprint_for(vc, self.settings, self._report)
        _b, h, n, c = first.shape
        self._dtype = dtype
        self._chunk_shape = (len(self._layers), 2, self._C, h, c // 2)
        cache = PagedCache(
            layout=LAYOUTS[kind](),
            layers=[self._kv[name] for name in self._layers],
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
            len(self._layers), tuple(first.shape), dtype, kind, backend, self._tp_rank, self._pp_rank,
            kvcopy.extension_status(),
        )  # fmt: skip

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._report

    def _attention_layer(self, layer: str):
        try:
            return self._vllm_config.compilation_config.static_forward_context[layer]
        except Exception:
            return None

    def _causal(self, layer: str) -> bool:
        """A decoder layer whose prefill is causal: a token's KV depends only on what precedes it
        (and on the multimodal inputs it belongs to, which the keys carry)."""
        attn = self._attention_layer(layer)
        if attn is None:
            return True  # no module to ask: the backend and shape checks still apply
        # AttentionType is a str enum: it compares equal to its value
        return "PrefixLM" not in type(attn).__name__ and getattr(attn, "attn_type", "decoder") == "decoder"

    def _backend_name(self, layer: str) -> str | None:
        try:
            return self._attention_layer(layer).get_attn_backend().get_name()
        except Exception:
            return None

    def _identity(self, device: torch.device) -> tuple[dict[str, str], str | None]:
        """The report's identity fields (start-up, before any request): the weights' digest
        (hashed once, cached on disk), software versions, compute capability, attention variant;
        or no fields and why, when the weights cannot be identified by content."""
        mc, lc = self._vllm_config.model_config, self._vllm_config.load_config
        try:
            if getattr(mc, "model_weights", ""):
                raise model_identity.UnknownWeights(
                    f"weights streamed from {mc.model_weights} are not local files"
                )
            ident = model_identity.weights_identity(
                str(mc.model),
                revision=mc.revision,
                download_dir=getattr(lc, "download_dir", None),
                cache_file=model_identity.default_cache_file(),
            )
        except Exception as exc:
            return {}, f"the model's weights cannot be identified by content ({exc})"
        model_identity.log_identity(str(mc.model), ident)
        impls = [getattr(self._attention_layer(name), "impl", None) for name in self._layers]
        variants = {model_identity.attention_variant(impl) for impl in impls}
        identity = {
            "weights": ident.digest,
            **model_identity.software_versions(),
            "device_capability": model_identity.device_capability(device),
            "attn_variant": ",".join(sorted(v for v in variants if v)),
        }
        return identity, None

    def _kv_quant(self) -> str | None:
        """ "none", or a digest of every layer's cache dtype and k/v scales: fp8 KV written with
        other scales holds other bytes for the same values. None when a quantised layer's scales
        are unknown: such a worker is refused (never shared under a fixed string)."""
        h = blake3.blake3(b"kvpool-kv-quant")
        quantised = False
        for name in self._layers:
            attn = self._attention_layer(name)
            dtype = str(getattr(attn, "kv_cache_dtype", self._vllm_config.cache_config.cache_dtype))
            h.update(f"{name}|{dtype}|".encode())
            if dtype != "auto":
                quantised = True
                for scale in ("_k_scale", "_v_scale"):
                    t = getattr(attn, scale, None)
                    if t is None:
                        return None
                    h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:32] if quantised else "none"

    def _spec(self, key: bytes) -> chunkfmt.ChunkSpec:
        return chunkfmt.ChunkSpec(
            key=key,
            fingerprint=self._fp.digest,
            dtype=self._dtype,
            shape=self._chunk_shape,
            token_count=self._C,
        )

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

    def _fail_load(self, job: LoadJob, chunk: int, from_token: int) -> None:
        """Blocks of ``job`` from ``from_token`` on are recomputed by vLLM; the scheduler is told
        (through the aggregated worker output) that the request's load failed at ``chunk``."""
        bs = self._block_size
        self._failed_blocks.update(job.block_ids[(from_token - job.start_token) // bs :])
        self._step_failed[job.req_id] = min(chunk, self._step_failed.get(job.req_id, chunk))
        metrics.STATS.add("load_failed_tokens", job.end_token - from_token)

    def _loaded(self, result: LoadResult) -> None:
        """Account for a finished load (main thread): failed blocks, metrics, one log line."""
        job = result.job
        if result.failed_chunk is not None:
            self._fail_load(job, result.failed_chunk, result.failed_from_token)
        metrics.STATS.add("loaded_tokens", result.ok_tokens)
        metrics.STATS.observe("load_seconds", result.seconds)
        missing = result.total_tokens - result.ok_tokens
        log.info(
            "Retrieved %d of %d tokens (%d chunks) from %s in %.1f ms%s",
            result.ok_tokens, job.prompt_tokens, result.ok_chunks, self._pool.name, 1000 * result.seconds,
            "" if not missing else f"; {missing} tokens failed, recomputing",
        )  # fmt: skip

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, KVPoolMetadata) and connector_metadata.fence and self._saver:
            self._saver.fence()  # before this step's forward pass may write a preempted request's blocks

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, KVPoolMetadata) or not meta.loads:
            return
        in_step: list[LoadJob] = []
        for task in meta.loads:
            job = self._job(task)
            if self._loader is None:  # cannot happen once the scheduler heard this worker; stay safe
                result = LoadResult(job, 0, 0, job.first_chunk, job.start_token, 0.0)
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

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved whole, one step later (see the module docstring): one copy per chunk

    def wait_for_save(self):
        meta = self._connector_metadata
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

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        meta = self._connector_metadata
        step = meta.step if isinstance(meta, KVPoolMetadata) else 0
        failed, self._step_failed = self._step_failed, {}
        return KVPoolWorkerMeta(step=step, failed=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Background loads that ended (loaded or failed: their failed blocks and chunks go out in
        this same step's output), and finished requests whose blocks nothing copies out of any
        more."""
        meta = self._connector_metadata
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
        flush_s = self.settings.shutdown_flush_ms / 1000
        if self.role == KVConnectorRole.WORKER:
            if self._loader is not None:
                self._loader.close()
            if self._saver is not None:
                self._saver.close(flush_s, why="engine shutdown")
                shutdown.unregister(self._saver)
            self._pool.close(flush_s)
        else:
            if self._lookup_pool is not None:
                self._lookup_pool.shutdown(wait=False, cancel_futures=True)
            self._pool.flush(flush_s)
