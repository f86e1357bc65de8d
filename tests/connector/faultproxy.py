"""A kvpool node in front of a real one that injects faults between a lookup and its load.

A test tool, run as its own process: ``python faultproxy.py UPSTREAM_URL PORT FAULTS_JSON``.
Every call is forwarded to the real pool at UPSTREAM_URL through the kvpool Client; values travel
over gRPC (Hello advertises no data channel). Before answering a Get, the proxy reads FAULTS_JSON:

* ``"delete_on_get": [hex keys]`` — the first Get asking for such a key deletes it upstream first:
  the chunk the scheduler's lookup found is gone when the worker loads it;
* ``"slow_on_get": [hex keys], "slow_s": s`` — the first Get asking for such a key answers only
  after s seconds, past the connector's deadline: the load is cut short;
* ``"always_slow_on_get": [hex keys]`` — every Get asking for such a key answers after slow_s.
* ``"slow_put_s": s`` — every Put is held s seconds before it is forwarded, and dropped if its
  client has gone meanwhile (as a node drops a put whose stream broke): a writer whose chunks land
  late, or never if it dies first (``slow put <number of values>``, ``put dropped``).

Every lookup is printed (``lookup <first key hex> <number of keys>``), so a test can count them;
so is every slowed Get (``slow get <first slowed key hex> <number of slowed keys>``) and every
call the upstream pool failed (``upstream failed: <kind>: <error>``).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent import futures

import grpc

from kvpool.cachenode import Client
from kvpool.cachenode.core.settings import MAX_FRAME_SIZE
from kvpool.cachenode.rpc.grpcframes import split_into_frames
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb
from kvpool.cachenode.rpc.proto import kvpool_pb2_grpc as pb_grpc


class FaultProxy(pb_grpc.CacheNodeServicer):
    def __init__(self, upstream: str, faults_path: str) -> None:
        self._up = Client(upstream, timeout=5)
        self._faults_path = faults_path
        self._done: set[str] = set()
        self._lock = threading.Lock()

    def _faults(self) -> dict:
        try:
            with open(self._faults_path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except Exception as exc:  # the upstream pool is down: so is the proxy
            print(f"upstream failed: {type(exc).__name__}: {exc}", flush=True)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"upstream: {exc}")

    def Hello(self, request, context):
        up = self._call(context, self._up.hello)
        return pb.HelloResponse(
            node_id="faultproxy",
            version=up.version,
            data_port=0,
            max_value_size=up.max_value_size,
            max_batch_keys=up.max_batch_keys,
            max_frame_size=up.max_frame_size,
        )

    def PrefixHits(self, request, context):
        keys = list(request.keys)
        print(f"lookup {bytes(keys[0]).hex() if keys else '-'} {len(keys)}", flush=True)
        if request.lease_ms:
            lease_id = request.lease_id or None  # the caller's id: any process releases by it
            count, lease = self._call(context, self._up.lease_prefix, keys, request.lease_ms, lease_id)
            return pb.CountResponse(count=count, lease_id=lease)
        return pb.CountResponse(count=self._call(context, self._up.prefix_hits, keys))

    def Release(self, request, context):
        keys = list(request.keys) or None
        return pb.CountResponse(count=self._call(context, self._up.release, request.lease_id, keys))

    def Contains(self, request, context):
        return pb.ContainsResponse(present=self._call(context, self._up.contains, list(request.keys)))

    def Delete(self, request, context):
        return pb.CountResponse(count=self._call(context, self._up.delete, list(request.keys)))

    def Stats(self, request, context):
        return pb.StatsResponse(json=json.dumps(self._call(context, self._up.stats)))

    def Put(self, request_iterator, context):
        frames = list(request_iterator)
        if not frames:
            return pb.PutResponse(stored=0)
        slow_s = float(self._faults().get("slow_put_s", 0))
        if slow_s:
            print(f"slow put {len(frames[0].entries)}", flush=True)
            time.sleep(slow_s)
            if not context.is_active():
                print("put dropped", flush=True)
                return pb.PutResponse(stored=0)
        data = b"".join(f.data for f in frames)
        items, pos = [], 0
        for e in frames[0].entries:
            items.append((bytes(e.key), data[pos : pos + e.size]))
            pos += e.size
        self._call(context, self._up.put_many, items)
        return pb.PutResponse(stored=len(items))

    def Get(self, request, context):
        keys = [bytes(k) for k in request.keys]
        faults = self._faults()
        wanted = {k.hex() for k in keys}
        with self._lock:
            doomed = [h for h in faults.get("delete_on_get", []) if h in wanted and h not in self._done]
            slow = [h for h in faults.get("slow_on_get", []) if h in wanted and h not in self._done]
            self._done.update(doomed + slow)
            slow += [h for h in faults.get("always_slow_on_get", []) if h in wanted]
        if doomed:
            self._call(context, self._up.delete, [bytes.fromhex(h) for h in doomed])
        if slow:
            print(f"slow get {slow[0]} {len(slow)}", flush=True)
            time.sleep(float(faults.get("slow_s", 2.0)))
        found = self._call(context, self._up.get_many, keys)
        values = [found.get(k) for k in keys]
        sizes = [-1 if v is None else len(v) for v in values]
        frames = list(split_into_frames((v for v in values if v is not None), MAX_FRAME_SIZE)) or [b""]
        for i, data in enumerate(frames):
            yield pb.GetFrame(sizes=sizes if i == 0 else (), data=data)


def main() -> None:
    upstream, port, faults = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_CacheNodeServicer_to_server(FaultProxy(upstream, faults), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("faultproxy ready", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
