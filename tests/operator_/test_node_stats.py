"""A pool's hit ratio and usage (`kubectl get kvp`) from its nodes' /metrics: the pure aggregation,
the events it leads to, and a real node's /metrics read by the operator's scraper."""

from __future__ import annotations

import pytest

from kvpool.cachenode import Client
from kvpool.cachenode.core import metrics as node_metrics
from kvpool.cli.devtools.local_servers import free_port, kvpool_up
from kvpool.operator import events, nodestats, scrape
from kvpool.operator.nodestats import NodeStats
from kvpool.operator.settings import parse

NODE_TEXT = """\
# HELP kvpool_node_requested_keys_total Keys asked for by get/get_many/prefix_hits
# TYPE kvpool_node_requested_keys_total counter
kvpool_node_requested_keys_total 40.0
# HELP kvpool_node_hit_keys_total Keys found by get/get_many/prefix_hits
# TYPE kvpool_node_hit_keys_total counter
kvpool_node_hit_keys_total 30.0
# HELP kvpool_tier_usage_bytes Bytes held by a tier
# TYPE kvpool_tier_usage_bytes gauge
kvpool_tier_usage_bytes{tier="memory"} 1.073741824e+09
kvpool_tier_usage_bytes{tier="disk"} 5.0e+10
# HELP kvpool_tier_capacity_bytes Byte budget of a tier
# TYPE kvpool_tier_capacity_bytes gauge
kvpool_tier_capacity_bytes{tier="memory"} 4.294967296e+09
# HELP kvpool_handoff_chunks_total Chunks handed over
# TYPE kvpool_handoff_chunks_total counter
kvpool_handoff_chunks_total{reason="rebalance",result="pushed"} 12.0
kvpool_handoff_chunks_total{reason="rebalance",result="failed"} 1.0
"""


def test_metric_names_are_the_nodes() -> None:
    """The operator names the node's metrics without importing them; they must stay the same."""
    assert f"{node_metrics.REQUESTED_KEYS._name}_total" == nodestats.REQUESTED_KEYS
    assert f"{node_metrics.HIT_KEYS._name}_total" == nodestats.HIT_KEYS
    assert node_metrics.TIER_USAGE._name == nodestats.TIER_USAGE
    assert node_metrics.TIER_CAPACITY._name == nodestats.TIER_CAPACITY
    assert f"{node_metrics.HANDOFF_CHUNKS._name}_total" == nodestats.HANDOFF_CHUNKS
    assert node_metrics.HANDOFF_CHUNKS._labelnames == ("reason", "result")


def test_parse_reads_the_memory_tier_and_the_key_counters() -> None:
    got = nodestats.parse(NODE_TEXT)
    assert got == NodeStats(
        requested_keys=40,
        hit_keys=30,
        memory_used=2**30,
        memory_capacity=4 * 2**30,
        handoff={("rebalance", "pushed"): 12, ("rebalance", "failed"): 1},
    )
    assert nodestats.parse("") == NodeStats()
    with pytest.raises(ValueError):
        nodestats.parse("kvpool_node_hit_keys_total not-a-number\n")


def test_aggregate_sums_the_nodes_that_answered() -> None:
    a = NodeStats(requested_keys=40, hit_keys=30, memory_used=2**30, memory_capacity=4 * 2**30)
    b = NodeStats(requested_keys=60, hit_keys=50, memory_used=2**29, memory_capacity=4 * 2**30)
    assert nodestats.aggregate([a, b]) == {"hitRatio": "80%", "usage": "1.5Gi/8Gi", "nodesReporting": 2}
    assert nodestats.aggregate([a, None, b]) == {"hitRatio": "80%", "usage": "1.5Gi/8Gi", "nodesReporting": 2}
    unknown = {"hitRatio": "unknown", "usage": "unknown", "nodesReporting": 0}
    assert nodestats.aggregate([None, None]) == unknown
    assert nodestats.aggregate([]) == unknown
    fresh = NodeStats(memory_capacity=256 * 2**20)
    assert nodestats.aggregate([fresh]) == {"hitRatio": "n/a", "usage": "0/256Mi", "nodesReporting": 1}


@pytest.mark.parametrize(
    ("hits", "lookups", "shown"),
    [(0, 0, "n/a"), (0, 10, "0%"), (10, 10, "100%"), (999, 1000, "99%"), (1, 1000, "1%"), (83, 100, "83%")],
)
def test_the_hit_ratio_never_rounds_to_all_or_nothing(hits: int, lookups: int, shown: str) -> None:
    assert nodestats.hit_ratio(hits, lookups) == shown


@pytest.mark.parametrize(
    ("n", "shown"),
    [(0, "0"), (1023, "1023"), (1024, "1Ki"), (1536, "1.5Ki"), (12 * 2**30, "12Gi"), (int(1.23 * 2**30), "1.2Gi"),
     (150 * 2**30, "150Gi"), (3 * 2**40, "3Ti")],
)  # fmt: skip
def test_human_size(n: int, shown: str) -> None:
    assert nodestats.human_size(n) == shown


def test_handoffs_are_what_grew_since_the_last_read() -> None:
    def node(pushed: float, failed: float = 0) -> NodeStats:
        return NodeStats(handoff={("rebalance", "pushed"): pushed, ("rebalance", "failed"): failed})

    assert nodestats.handoffs({"p-0": node(10)}, {"p-0": node(10)}) == []
    assert nodestats.handoffs({"p-0": node(10)}, {"p-0": node(25, 2), "p-1": node(7)}) == [
        ("p-0", "rebalance", {"failed": 2, "pushed": 15})
    ]  # p-1 has no baseline yet
    assert nodestats.handoffs({"p-0": node(10)}, {"p-0": node(3)}) == []  # restarted: a new baseline
    (event,) = events.handoff_events({"p-0": node(10)}, {"p-0": node(25, 2)})
    assert event == (
        "HandedOff",
        "node p-0 handed 17 chunks to their new owners (rebalance): 2 failed, 15 pushed",
    )


def _sts(replicas: int, config_hash: str = "a", image: str = "kvpool:1") -> dict:
    return {
        "spec": {
            "replicas": replicas,
            "template": {
                "metadata": {"annotations": {"kvpool.io/config-hash": config_hash}},
                "spec": {"containers": [{"name": "node", "image": image}]},
            },
        }
    }


def test_change_events_say_scaled_and_rolling_out() -> None:
    assert events.change_events(None, _sts(3)) == []  # a new pool: neither
    assert events.change_events(_sts(3), _sts(3)) == []
    assert events.change_events(_sts(3), _sts(5)) == [("Scaled", "cache nodes scaled from 3 to 5")]
    ((reason, message),) = events.change_events(_sts(3), _sts(3, config_hash="b"))
    assert reason == "RollingOut" and message.startswith("configuration changed: rolling 3 cache nodes")
    reasons = [r for r, _ in events.change_events(_sts(3), _sts(4, image="kvpool:2"))]
    assert reasons == ["Scaled", "RollingOut"]


def _status(phase: str, progressing: str, ready: int = 3) -> dict:
    return {
        "phase": phase,
        "readyReplicas": ready,
        "conditions": [{"type": "Progressing", "status": progressing}],
    }


def test_status_events_say_rolled_out_once() -> None:
    assert events.status_events(_status("Progressing", "True"), _status("Running", "False")) == [
        ("RolledOut", "3/3 cache nodes updated and ready")
    ]
    assert events.status_events(_status("Running", "False"), _status("Running", "False")) == []
    assert events.status_events(_status("Progressing", "True"), _status("Progressing", "True")) == []
    assert events.status_events({}, _status("Running", "False")) == []


def test_pools_with_auth_or_tls_are_not_read() -> None:
    plain = parse("p", "ns", {"replicas": 2})
    assert scrape.node_urls(plain) == {
        "p-0": "http://p-0.p-nodes.ns.svc:7401/metrics",
        "p-1": "http://p-1.p-nodes.ns.svc:7401/metrics",
    }
    assert scrape.unreadable(plain) is None
    auth = parse("p", "ns", {"replicas": 2, "auth": {"tokenSecret": {"name": "t"}}})
    assert "spec.auth" in scrape.unreadable(auth)
    assert scrape.read(auth, timeout=1) == {"p-0": None, "p-1": None}
    tls = parse("p", "ns", {"replicas": 1, "tls": {"secretName": "s"}})
    assert "spec.tls" in scrape.unreadable(tls)
    assert scrape.read(plain, timeout=0) is None  # turned off


def test_a_real_nodes_metrics_give_its_hit_ratio_and_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvpool up` on a free port: 3 keys put, 4 asked for (3 found), and a node that does not answer."""
    http_port = free_port()
    with (
        kvpool_up("--http-port", str(http_port), "--memory", "256MiB") as (_proc, url),
        Client(url) as client,
    ):
        for i in range(3):
            client.put(f"key-{i}".encode(), bytes(1000) * (i + 1))
        assert client.get_many([b"key-0", b"key-1", b"key-2", b"absent"]).keys() == {
            b"key-0",
            b"key-1",
            b"key-2",
        }
        s = parse("p", "ns", {"replicas": 2})
        urls = {
            "p-0": f"http://127.0.0.1:{http_port}/metrics",
            "p-1": f"http://127.0.0.1:{free_port()}/metrics",  # nothing listens: left out
        }
        monkeypatch.setattr(scrape, "node_urls", lambda _s: urls)
        got = scrape.read(s, timeout=2)
    assert got is not None and got["p-1"] is None
    one = got["p-0"]
    assert one is not None and one.requested_keys == 4 and one.hit_keys == 3
    assert one.memory_capacity == 256 * 2**20 and one.memory_used >= 6000
    fields = nodestats.aggregate(list(got.values()))
    assert fields["hitRatio"] == "75%" and fields["nodesReporting"] == 1
    assert fields["usage"].endswith("/256Mi")


def test_a_node_that_skips_a_read_keeps_its_handoff_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    posted: list[events.Event] = []
    monkeypatch.setattr(events, "post", lambda _pool, evs: posted.extend(evs))
    pool = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1"}}

    def node(pushed: float) -> NodeStats:
        return NodeStats(handoff={("rebalance", "pushed"): pushed})

    try:
        events.stats_read("u-1", pool, {"p-0": node(5), "p-1": node(0)})  # the first read: a baseline
        events.stats_read("u-1", pool, {"p-0": None, "p-1": node(0)})  # p-0 does not answer
        events.stats_read("u-1", pool, {"p-0": node(9), "p-1": node(0)})
        assert [m for _, m in posted] == [
            "node p-0 handed 4 chunks to their new owners (rebalance): 4 pushed"
        ]
    finally:
        events.forget("u-1")


def test_a_node_that_answers_garbage_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not HTTP at all, or HTTP without Prometheus text: that node is left out, nothing raises."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotPrometheus(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"kvpool_node_hit_keys_total lots\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), NotPrometheus)
    raw = socket.create_server(("127.0.0.1", 0))

    def junk() -> None:
        conn, _ = raw.accept()
        conn.recv(4096)
        conn.sendall(b"\x00\x01 not http\r\n\r\n")
        conn.close()

    threads = [
        threading.Thread(target=http.serve_forever, daemon=True),
        threading.Thread(target=junk, daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        urls = {
            "p-0": f"http://127.0.0.1:{http.server_address[1]}/metrics",
            "p-1": f"http://127.0.0.1:{raw.getsockname()[1]}/metrics",
        }
        monkeypatch.setattr(scrape, "node_urls", lambda _s: urls)
        assert scrape.read(parse("p", "ns", {"replicas": 2}), timeout=2) == {"p-0": None, "p-1": None}
    finally:
        http.shutdown()
        http.server_close()
        raw.close()
