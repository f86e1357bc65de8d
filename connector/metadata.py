"""What the connector's scheduler side and worker side tell each other, and nothing else.

The two sides run in different processes (the engine core and each worker), so these are plain,
picklable fields only: the scheduler's orders for one step (``KVPoolMetadata``: loads, saves,
releases), each worker's outcome of that step (``KVPoolWorkerMeta``, aggregated by vLLM over every
worker before the scheduler reads it) and each worker's report at start-up (``WorkerReport``, sent
once through vLLM's handshake).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


# -- scheduler → workers, once per step -------------------------------------------------------------
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
    misses: dict[str, int] = field(default_factory=dict)  # the request's miss reasons, for its log line


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
    why: dict[str, str] = field(default_factory=dict)  # request → why that chunk failed (miss_reasons)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, KVPoolWorkerMeta):
            self.step = max(self.step, other.step)
            for req, chunk in other.failed.items():
                if req not in self.failed or chunk < self.failed[req]:  # the first failed chunk's reason
                    self.failed[req] = chunk
                    self.why[req] = other.why.get(req, "internal")
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
