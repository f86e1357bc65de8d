"""The connector's scheduler side (vLLM's engine core): which prompt chunks to load from the pool,
which computed chunks to store, and when a request's blocks may be freed.

A request's prompt → chained chunk keys (keys.py) that carry every other input that changes the KV
(request_keys.py) → one batched lookup that pins what it found (a lease), run in a lookup thread and
waited for only as long as a healthy pool takes (lookup_wait.py), so that a healthy pool answers
within vLLM's call and a slow one never holds up a scheduling step for long (until its answer is
known vLLM is told to ask again; answers are kept per request) → the longest run of full chunks
the pool holds, always leaving at least one prompt token for vLLM to compute. Chunks are stored
only one step after they were computed, once every worker's aggregated output showed no failed
load for the request.

It talks to the workers only through metadata.py and to the pool only through the connector's
pool protocol (backend.py), so it runs with a fake pool and no engine (tests/connector).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from kvpool.cachenode.core.settings import ConnectorSettings, loads_async

from . import lookup_wait, metrics, miss_account, worker_orders
from .keys import ModelFingerprint, chunk_keys
from .lookup_wait import Ask, LookupWait
from .metadata import KVPoolMetadata, KVPoolWorkerMeta, LoadTask, WorkerReport
from .pd_wait import PrefillWaits
from .request_keys import AdapterDigests, key_inputs
from .request_state import RequestState

if TYPE_CHECKING:
    from .backend import SafePool

log = init_logger(__name__)

LEASE_REUSE_MARGIN_S = 1.0  # a lookup's lease is reused while it has at least this long to live
WARM_UP_KEY = b"kvpool-warm-up-probe".ljust(32, b"\0")
MISS_RECHECK_S = 0.5
"""An answer that loads nothing is trusted this long, then asked again in the background while it
stands: a waiting request that vLLM cannot schedule yet is asked about every step, and another
engine may store its prefix meanwhile. A miss pins nothing, so nothing can expire under it."""


class ConnectorScheduler:
    """The scheduler-side half of ``KVPoolConnector``; off until every worker has reported.

    ``fingerprint`` turns a worker's report into the fingerprint its chunks are keyed under
    (engine_config.fingerprint_for in an engine); ``refusals`` are the engine's own (eligibility.py).
    """

    def __init__(
        self,
        settings: ConnectorSettings,
        pool: SafePool,
        *,
        tp: int,
        pp: int,
        block_size: int,
        fingerprint: Callable[[WorkerReport], ModelFingerprint],
        refusals: list[str] | None = None,
        consumer: bool = False,
    ) -> None:
        self.settings = settings
        self._pool = pool
        self._tp, self._pp = tp, pp
        self._block_size = block_size
        self._C = settings.chunk_size
        self._fingerprint = fingerprint
        self._refusals = list(refusals or [])
        self._enabled = False
        self._async_loads = loads_async(settings)
        self._kv_cache_manager: Any = None  # vLLM's: get_block_ids(request) → blocks per group
        self._background: list[str] = []  # requests whose background load is sent this step
        self._lookup_pool: ThreadPoolExecutor | None = None
        self._wait = LookupWait(settings.lookup_wait_ms / 1000, lookup_wait.FLOOR_S)
        self._reqs: dict[str, RequestState] = {}
        self._fps: list[ModelFingerprint] = []  # index = pp_rank * tp + tp_rank
        self._adapters = AdapterDigests()
        self._logged_refusals: set[str] = set()
        self._off_local: dict[str, int] = {}  # cache off: requests asked about → vLLM's own tokens
        self._step = 0
        self._pd = PrefillWaits(
            settings.announced_wait_ms, self._C, load=settings.load, save=settings.save, consumer=consumer
        )
        self.warming: Future | None = None  # the lookup that opens the pool's connection

    @property
    def enabled(self) -> bool:
        return self._enabled

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        self._kv_cache_manager = kv_cache_manager

    # -- start-up: the workers' reports ----------------------------------------------------------
    def set_worker_reports(self, metadata: dict[tuple[int, int], Any]) -> None:
        """Every worker's report, keyed (pp_rank, tp_rank): the cache turns on only when all of
        them can be served, and each rank's chunks are keyed with its own fingerprint."""
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
        self._fps = [self._fingerprint(reports[(pp, tp)]) for pp in range(self._pp) for tp in range(self._tp)]
        self._enabled = True
        for fp in self._fps:
            log.info(
                "kvpool: chunk keys of tp%d/pp%d use fingerprint %s %s",
                fp.tp_rank, fp.pp_rank, fp.digest.hex()[:16], json.dumps(asdict(fp), sort_keys=True),
            )  # fmt: skip
        # Open the pool's connection now, not in the first request's lookup: connecting takes
        # tens of ms, and that request would wait steps for it (a key nobody stores: a miss).
        self.warming = self._lookups().submit(self._pool.prefix_hits, [WARM_UP_KEY])

    # -- lookups ---------------------------------------------------------------------------------
    def _refuse_once(self, reason: str) -> None:
        metrics.STATS.add("refused_requests")
        if reason not in self._logged_refusals:
            self._logged_refusals.add(reason)
            log.warning("kvpool: not caching requests with %s (neither loaded nor stored)", reason)

    def _state(self, request: Any) -> RequestState:
        """The request's state; its keys are hashed later, by ``_hash_keys`` in a lookup thread
        (a prompt shorter than a chunk has none to hash)."""
        st = self._reqs.get(request.request_id)
        if st is None:
            n = int(request.num_prompt_tokens)
            st = RequestState(
                keys=None if n >= self._C else {r: [] for r in range(len(self._fps))}, prompt_tokens=n
            )
            self._reqs[request.request_id] = st
        return st

    def _hash_keys(self, st: RequestState, request: Any) -> None:
        """Every rank's chunk keys of ``request`` (or why it cannot be keyed). Runs once per
        request, in a lookup thread: reading the prompt, a LoRA adapter's digest (hashed when the
        adapter is first seen) and hashing a long prompt stay off the scheduler thread."""
        inputs = key_inputs(request, self._C, self._adapters)
        if inputs.refused:
            self._refuse_once(inputs.refused)
            st.refused, st.refused_feature = inputs.refused, inputs.refused_feature
            st.keys = {r: [] for r in range(len(self._fps))}
            return
        st.keys = {
            r: chunk_keys(fp, inputs.tokens, salt=inputs.salt, adapter=inputs.adapter, extras=inputs.extras)
            for r, fp in enumerate(self._fps)
        }

    def _interleaved(self, st: RequestState, n: int) -> list[bytes]:
        """Chunk-major keys of every rank: a chunk counts only if every rank's shard is there."""
        return [st.keys[r][i] for i in range(n) for r in range(len(self._fps))]

    def _lookups(self) -> ThreadPoolExecutor:
        if self._lookup_pool is None:
            self._lookup_pool = ThreadPoolExecutor(2, thread_name_prefix="kvpool-lookup")
        return self._lookup_pool

    def _ensure_keys(self, st: RequestState, request: Any) -> None:
        """Hash ``st``'s keys unless another lookup thread has (one hashing per request)."""
        with st.keys_lock:
            if st.keys is not None:
                return
            try:
                self._hash_keys(st, request)
            except Exception as exc:  # never fail a request over its keys: neither load nor store
                log.warning(
                    "kvpool: could not key a request (%s: %s); not caching it", type(exc).__name__, exc
                )
                st.refused, st.refused_feature, st.keys = (
                    f"unkeyable input ({type(exc).__name__})",
                    "unkeyable",
                    {r: [] for r in range(len(self._fps))},
                )

    def _ask_pool(
        self, ask: Ask, st: RequestState, request: Any | None, lease_ms: int
    ) -> tuple[int, int, float, str | None]:
        """One batched lookup (in a lookup thread): (found, lease id, when it was asked, why the
        pool gave no answer: a miss_reasons "pool_unreachable" detail, None when it did). The
        request's keys are hashed first if they are not yet; the lookup goes no further than the
        request may load (``load_limit``). Its timing feeds the scheduler's wait (lookup_wait.py)."""
        hash_s, tokens, asked_pool = 0.0, 0, False
        try:
            if st.keys is None:
                t0 = time.perf_counter()
                self._ensure_keys(st, request)
                hash_s, tokens = time.perf_counter() - t0, st.prompt_tokens
            n = len(st.keys[0]) if st.load_limit is None else min(st.load_limit, len(st.keys[0]))
            asked = time.monotonic()
            if st.refused or n == 0:
                return 0, 0, asked, None
            t0 = time.perf_counter()
            count, lease_id, why = self._pool.lookup(self._interleaved(st, n), lease_ms)
            metrics.STATS.observe("lookup_seconds", time.perf_counter() - t0)
            metrics.STATS.add("lookups")
            asked_pool = True
            return count, lease_id, asked, why
        finally:
            self._wait.answered(ask, time.perf_counter(), hash_s, tokens, asked_pool)

    def _hit_tokens(self, st: RequestState) -> int:
        """Tokens the request may load from the pool's last answer: full chunks, but at least one
        prompt token left for vLLM to compute (it needs one to produce logits): the last chunk
        may be loaded up to a block boundary."""
        if not self.settings.load:
            return 0
        limit = (st.prompt_tokens - 1) // self._block_size * self._block_size
        return min(st.pool_chunks * self._C, limit)

    def _lookup(self, st: RequestState, request: Any, computed: int) -> bool:
        """Bring ``st``'s pool answer up to date; False while it is not known yet (vLLM then asks
        again in a later step). A healthy pool answers within this call (the wait of
        lookup_wait.py); a pool whose breaker is open is not waited for and answers a miss; an
        answer that loads nothing stands for ``MISS_RECHECK_S`` and then while it is asked again."""
        lease_ms = self.settings.lease_ms if self.settings.load else 0
        if st.lookup is None:
            if self._pd.held(st.pd):  # waiting for its prefill engine's chunks (pd_wait.py)
                return False
            now = time.monotonic()
            if st.lease is not None and st.lease[1] - LEASE_REUSE_MARGIN_S > now:
                return True  # the last lookup's pins still hold: its answer stands
            if st.nothing_until is not None and now < st.nothing_until and self._hit_tokens(st) <= computed:
                return True  # a remembered answer that loads nothing: no lookup every step
            self._drop_lease(st)
            if st.keys is not None and (
                not st.keys[0] or (st.load_limit is not None and st.load_limit * self._C <= computed)
            ):  # nothing more this request may load (its last load failed there): no lookup at all
                return True  # pool_chunks stays as the failure left it (_roll_back)
            st.lookup = Ask(time.perf_counter())
            st.lookup.future = self._lookups().submit(
                self._ask_pool, st.lookup, st, request if st.keys is None else None, lease_ms
            )
        # A miss may stand in for the answer: the last answer still loads nothing (it is being
        # asked again), or the pool is skipped (breaker open: its lookup answers a miss anyway).
        stand_in = (
            st.nothing_until is not None and self._hit_tokens(st) <= computed
        ) or self._pool.skipping()
        wait = 0.0 if stand_in else self._wait.budget(st.prompt_tokens if st.keys is None else 0)
        t0 = time.perf_counter()
        try:
            count, lease_id, asked, why = st.lookup.future.result(timeout=wait)
        except TimeoutError:
            if wait:
                metrics.STATS.observe("lookup_wait_seconds", time.perf_counter() - t0)
            if stand_in:  # a miss for now; the lookup's answer is read at the next call
                st.found_in_pool(0, 0, None, "breaker_open" if self._pool.skipping() else st.unreachable)
                return True
            self._wait.gave_up(st.lookup)
            metrics.STATS.add("lookup_skipped_steps")
            return False
        except Exception:  # cannot happen (SafePool answers misses); stay safe
            count, lease_id, asked, why = 0, 0, time.monotonic(), "error"
        if wait:
            metrics.STATS.observe("lookup_wait_seconds", time.perf_counter() - t0)
        if self._held_for_prefill(st, request, count // len(self._fps)):
            self._pool.release(lease_id)
            st.lookup = None
            return False
        st.lookup, st.asked_at, st.nothing_until = None, asked, None
        st.found_in_pool(
            count // len(self._fps), count, (lease_id, asked + lease_ms / 1000) if lease_id else None, why
        )
        return True

    def _held_for_prefill(self, st: RequestState, request: Any, found: int) -> bool:
        """Whether the answer is dropped: the request waits for chunks its prefill engine is still
        storing (pd_wait.py)."""
        if not st.keys or not st.keys[0]:
            return False
        limit = len(st.keys[0]) if st.load_limit is None else min(st.load_limit, len(st.keys[0]))
        st.pd = self._pd.hold(st.pd, request, st.keys[0], st.prompt_tokens, found, limit)
        return st.pd.waiting

    def _drop_lease(self, st: RequestState, pending: bool = True) -> None:
        """The lookup's pins are not going to be read: end them now rather than at expiry (a
        lookup still running ends its pins when it answers, unless ``pending`` is False: the
        request still waits for that answer)."""
        if st.lookup is not None and pending:
            st.lookup.future.add_done_callback(self._release_answer)
            st.lookup = None
        if st.lease is not None:
            self._pool.release(st.lease[0])
            st.lease = None

    def _release_answer(self, answer: Future) -> None:
        try:
            _count, lease_id, _asked, _why = answer.result()
        except Exception:
            return
        self._pool.release(lease_id)

    # -- vLLM's scheduler calls --------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._enabled:  # refused (no request comes before every worker has reported)
            self._off_local[request.request_id] = num_computed_tokens
            return 0, False
        st = self._state(request)
        st.local = num_computed_tokens
        if st.refused:
            return 0, False
        if (self.settings.load or self.settings.save) and not self._lookup(st, request, num_computed_tokens):
            return None, False  # not known yet: vLLM skips the request this step and asks again
        if st.refused:  # found out while hashing its keys
            return 0, False
        hit_tokens = self._hit_tokens(st)
        if not st.counted:
            st.counted = True
            metrics.STATS.add("requests")
            metrics.STATS.add("requested_tokens", st.prompt_tokens)
            metrics.STATS.add("hit_tokens", hit_tokens)
        if hit_tokens <= num_computed_tokens:
            st.load = None
            self._drop_lease(st, pending=False)
            if st.lookup is None and st.nothing_until is None:
                st.nothing_until = st.asked_at + MISS_RECHECK_S
            return 0, False
        st.load = (num_computed_tokens, hit_tokens)
        return hit_tokens - num_computed_tokens, self._async_loads

    def update_state_after_alloc(self, request: Any, num_external_tokens: int) -> None:
        st = self._reqs.get(request.request_id)
        if st is None:
            local = self._off_local.pop(request.request_id, None)
            if local is not None and not getattr(request, "num_preemptions", 0):
                miss_account.count_refused_engine(int(request.num_prompt_tokens), local)
            return
        offered = st.load is not None
        if num_external_tokens > 0 and st.load is not None:
            end = st.load[1]
            st.load = (end - num_external_tokens, end)
            if self._async_loads:  # not scheduled until loaded: sent to the workers this step
                self._background.append(request.request_id)
        else:
            st.load = None
            self._drop_lease(st)
        if not st.classified:  # once: a request vLLM preempts and schedules again is not recounted
            st.classified = True
            st.missed = miss_account.classify_request(
                st, chunk_size=self._C, block_size=self._block_size, load_on=self.settings.load,
                declined=offered and st.load is None, pool_name=self._pool.name,
            )  # fmt: skip

    def update_connector_output(self, connector_output: Any) -> None:
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
                miss_account.count_failed_load(st, chunk, wm.why.get(req_id, "internal"), self._C)
                self._roll_back(st, chunk)
                st.load_limit = chunk if st.load_limit is None else min(st.load_limit, chunk)
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid and self._kv_cache_manager is not None:
            for req_id, chunk in self._readers_of(set(invalid), skip=wm.failed).items():
                self._roll_back(self._reqs[req_id], chunk)
        for st in self._reqs.values():
            st.confirm(wm.step)

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

    def _roll_back(self, st: RequestState, chunk: int) -> None:
        metrics.STATS.add("unsaved_tokens", st.roll_back(chunk) * self._C)

    def build_connector_meta(self, scheduler_output: Any) -> KVPoolMetadata:
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
                st.preempted()
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
            if self.settings.save:
                st.record(self._step, min(len(st.keys[0]), (computed[req_id] + n_sched) // self._C))
        return meta

    def _load_task(self, req_id: str, st: RequestState, background: bool) -> LoadTask:
        blocks = self._kv_cache_manager.get_block_ids(req_id)[0]
        return worker_orders.load_task(
            req_id,
            st,
            blocks,
            chunk=self._C,
            block=self._block_size,
            ranks=len(self._fps),
            background=background,
        )

    def _confirmed_saves(self, meta: KVPoolMetadata) -> None:
        worker_orders.confirmed_saves(
            self._reqs,
            lambda r: self._kv_cache_manager.get_block_ids(r)[0],
            meta,
            chunk=self._C,
            block=self._block_size,
        )

    def request_finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        self._off_local.pop(request.request_id, None)
        st = self._reqs.get(request.request_id)
        if st is None:
            return False, None
        self._drop_lease(st)
        if st.loading:  # aborted while loading: vLLM itself keeps its blocks until the load ends
            del self._reqs[request.request_id]
            return False, None
        # a prefill engine's answer says which chunks it is storing (pd_wait.py)
        params = self._pd.announcement(request, st.keys[0] if st.keys else None, st.recorded_upto)
        if self._enabled and (st.pending or st.confirmed_upto > st.saved_upto or st.saving):
            # keep the blocks until the confirmed chunks are stored and every copy out of them
            # has finished (on a GPU those run on a side stream)
            st.finished = True
            return True, params
        del self._reqs[request.request_id]
        return False, params

    def shutdown(self, flush_s: float) -> None:
        if self._lookup_pool is not None:
            self._lookup_pool.shutdown(wait=False, cancel_futures=True)
        self._pool.flush(flush_s)
