"""The settings of engine pods: the pool a client reaches (`url`, `chunk_size`, TLS, token), and
the connector's own switches, read from vLLM's kv_connector_extra_config or `KVPOOL_<NAME>`.

None is a flag: the connector reads extra_config first, then the env var (connector.py).
"""

from __future__ import annotations

from typing import Any

from kvpool.cachenode.core.settings.parsers import auto_or_boolean, integer, lenient_boolean, path, size
from kvpool.cachenode.core.settings.setting import AGENT, AGENT_ONLY, CLIENT, CLIENT_ONLY, Setting

_CONNECTOR: dict[str, Any] = {
    "group": "connector",
    "commands": frozenset(),
    "readers": CLIENT_ONLY,
    "flag_name": "",
}
"""Connector settings have no flag: extra_config or the env var."""

CLIENT_SETTINGS: tuple[Setting, ...] = (
    # -- what engine pods read (the connector, `Client`); the operator hands these out in its ConfigMap
    Setting(
        "url",
        None,
        "The pool: grpc:// or grpcs:// URL of a node, an agent, `kvpool up` or the pool's "
        "Service, or a comma list of node URLs (flag of `kvpool status`; connector: extra_config `url`).",
        group="client",
        kind="URL",
        commands=frozenset(),
        readers=CLIENT_ONLY,
        flag_name="--url",
    ),
    Setting(
        "chunk_size",
        256,
        "Tokens per chunk, part of every chunk key (connector: extra_config `chunk_size`).",
        integer(1, 1 << 20),
        group="client",
        kind="int",
        commands=frozenset(),
        readers=CLIENT_ONLY,
        flag_name="",
    ),
    Setting(
        "tls_ca_file",
        None,
        "CA certificate (PEM) that clients and agents verify a grpcs:// pool, lookup service or "
        "peer agent against (flag of `kvpool status`; default: the system's roots).",
        path,
        group="client",
        kind="path",
        commands=AGENT_ONLY,
        readers=frozenset({AGENT, CLIENT}),
        flag_name="--tls-ca-file",
    ),
    Setting(
        "auth_token",
        None,
        "Bearer token that clients send (connector; or KVPOOL_AUTH_TOKEN_FILE).",
        group="client",
        commands=frozenset(),
        readers=CLIENT_ONLY,
        secret=True,
        flag_name="",
    ),
    Setting(
        "miss_fallback_nodes",
        2,
        "Next nodes in rendezvous order a read also asks after its owners miss, while some member "
        "is not in every node's view (nodes without --peers, a node given to the client before "
        "the others know it): keys a client with a shorter list placed there stay hits. 0: never.",
        integer(0, 16),
        group="client",
        kind="int",
        commands=frozenset(),
        readers=CLIENT_ONLY,
        flag_name="",
    ),
    # -- the connector's own (vLLM engine pods): extra_config key, else KVPOOL_<NAME>
    Setting(
        "timeout_ms",
        500.0,
        "Deadline of every remote pool call, milliseconds.",
        float,
        kind="number",
        **_CONNECTOR,
    ),
    Setting("load", True, "Look up and load chunks.", lenient_boolean, kind="bool", **_CONNECTOR),
    Setting("save", True, "Store newly computed chunks.", lenient_boolean, kind="bool", **_CONNECTOR),
    Setting(
        "layerwise",
        True,
        "Synchronous loads: scatter layer i just before layer i's attention.",
        lenient_boolean,
        kind="bool",
        **_CONNECTOR,
    ),
    Setting(
        "load_async",
        "auto",
        "Load hits in the background (vLLM's load-async path): auto = for a remote pool or agent, "
        "not for the embedded pool; true; false.",
        auto_or_boolean,
        kind="choice",
        **_CONNECTOR,
    ),
    Setting(
        "lookup_wait_ms",
        5.0,
        "The most the scheduler waits for a lookup inside vLLM's call (less when the pool's recent "
        "lookups were faster; 0 = never), else the request waits a step (0..1000 ms).",
        float,
        kind="number",
        **_CONNECTOR,
    ),
    Setting(
        "announced_wait_ms",
        1000.0,
        "Disaggregated prefill: how long a request waits for the chunks its prefill engine stores "
        "(those announced in its kv_transfer_params; on a kv_consumer without one, every full "
        "prompt chunk) before computing what is missing (0 = no wait; docs/disaggregated.md).",
        float,
        kind="number",
        **_CONNECTOR,
    ),
    Setting(
        "save_buffer",
        "1GiB",
        "Host bytes (pinned on GPUs) for chunks copied out and not yet written.",
        size,
        kind="size",
        **_CONNECTOR,
    ),
    Setting(
        "model_id",
        None,
        "A name added to the chunk fingerprint (the weights' digest identifies the model).",
        **_CONNECTOR,
    ),
    Setting(
        "load_failure_policy",
        "recompute",
        "What vLLM does when a load fails: recompute or fail.",
        kind="choice",
        **_CONNECTOR,
    ),
    Setting(
        "lease_ms",
        10_000,
        "A lookup pins what it found this long, until the worker read it (0 = off; at most 600000).",
        int,
        kind="int",
        **_CONNECTOR,
    ),
    Setting(
        "shutdown_flush_ms",
        5000.0,
        "At shutdown (SIGINT, SIGTERM) wait this long for queued saves (0..600000 ms).",
        float,
        kind="number",
        **_CONNECTOR,
    ),
)
