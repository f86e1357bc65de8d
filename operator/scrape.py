"""Reading a pool's nodes' /metrics for its status: the I/O half of `nodestats`.

Each status pass reads every node's HTTP port (`http://<pod>.<pool>-nodes.<ns>.svc:7401/metrics`,
the name the headless Service publishes before the pod is ready) in parallel, each with a short
timeout. A node that does not answer is left out of the figures and logged once when it stops
answering and once when it is back, never failing the pass. Pools with `spec.auth` or `spec.tls`
are not read: /metrics then needs the pool's token or CA, which live in Secrets the operator has no
right to read (its RBAC has no Secret access); their figures are "unknown".
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from . import naming
from .builders.common import NODE_HTTP_PORT
from .nodestats import NodeStats, parse
from .settings import PoolSettings

STATS_TIMEOUT = float(os.environ.get("KVPOOL_STATS_TIMEOUT", "2"))
"""Seconds to wait for one node's /metrics; 0 turns reading node stats off."""
MAX_BODY = 8 << 20
MAX_THREADS = 32

log = logging.getLogger(__name__)
_failing: set[str] = set()
_failing_guard = threading.Lock()


def node_urls(s: PoolSettings) -> dict[str, str]:
    """Each node's /metrics URL, by pod name."""
    sts, headless = naming.statefulset_name(s.name), naming.headless_service_name(s.name)
    return {
        f"{sts}-{i}": f"http://{sts}-{i}.{headless}.{s.namespace}.svc:{NODE_HTTP_PORT}/metrics"
        for i in range(s.replicas)
    }


def unreadable(s: PoolSettings) -> str | None:
    """Why the operator cannot read this pool's node stats (None: it can)."""
    if s.auth_token is not None:
        return "spec.auth is on (/metrics needs the pool's token)"
    if s.tls_secret:
        return "spec.tls is on (/metrics needs the pool's CA)"
    return None


def fetch(url: str, timeout: float) -> NodeStats:
    """One node's figures; raises (OSError, http.client.HTTPException, ValueError) when it cannot be read."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read(MAX_BODY).decode("utf-8", errors="replace"))


def _fetch_logged(pool: str, node: str, url: str, timeout: float) -> NodeStats | None:
    try:
        stats = fetch(url, timeout)
    except Exception as exc:  # refused, timed out, not HTTP, not Prometheus text: never the pass's failure
        with _failing_guard:
            first = url not in _failing
            _failing.add(url)
        (log.info if first else log.debug)(
            f"Stats of node {node} of {pool} unreadable ({exc}); left out of the pool's hit ratio and usage"
        )
        return None
    with _failing_guard:
        back = url in _failing
        _failing.discard(url)
    if back:
        log.info(f"Stats of node {node} of {pool} readable again")
    return stats


def read(s: PoolSettings, timeout: float | None = None) -> dict[str, NodeStats | None] | None:
    """Every node's figures (None for a node that did not answer, or for every node when
    `unreadable`); None when reading is turned off (KVPOOL_STATS_TIMEOUT=0)."""
    timeout = STATS_TIMEOUT if timeout is None else timeout
    if timeout <= 0:
        return None
    urls = node_urls(s)
    pool = f"{s.namespace}/{s.name}"
    why = unreadable(s)
    if why is not None:
        with _failing_guard:
            first = pool not in _failing
            _failing.add(pool)
        if first:
            log.info(f"Node stats of {pool} are not read: {why}; its hit ratio and usage stay unknown")
        return dict.fromkeys(urls)
    if not urls:
        return {}
    with ThreadPoolExecutor(min(MAX_THREADS, len(urls)), thread_name_prefix="kvpool-stats") as pool_:
        futures = {node: pool_.submit(_fetch_logged, pool, node, url, timeout) for node, url in urls.items()}
        return {node: f.result() for node, f in futures.items()}
