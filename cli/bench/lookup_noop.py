"""The same-run ceilings of `kvpool bench lookup`: a lookup service with nothing to look up.

`python -m kvpool.cli.bench.lookup_noop GRPC_PORT` serves, on loopback, the two transports the
lookup service answers queries on, each with the service's own serving code and an empty index
in place of the real one:
- gRPC: the service's thread pool; Locate answers an empty message, Hello names the query channel;
- the query channel: the service's `QueryChannel` (framing, per-connection threads, metrics,
  fingerprints of the keys) over an index that holds nothing (every answer: prefix 0).
The bench pins it to the service's CPU.
"""

from __future__ import annotations

import sys

NOOP_TOKEN = b"kvpool-bench-noop"


class _EmptyIndex:
    """What the query channel asks of an index, answered without looking anything up."""

    def __init__(self) -> None:
        from kvpool.cachenode.core.located import Located

        self._empty = Located(0, [], True)

    def locate(self, fps):
        return self._empty


def serve_noop(port: int) -> None:
    from concurrent import futures

    import grpc

    from kvpool.cachenode.rpc.proto import lookup_pb2 as pb
    from kvpool.cachenode.server.lookup.querychannel import QueryChannel
    from kvpool.cachenode.server.lookup.server import GRPC_WORKERS
    from kvpool.cachenode.server.lookup.service import check_scores_request

    queries = QueryChannel(
        _EmptyIndex(),  # type: ignore[arg-type]
        "127.0.0.1",
        0,
        token=NOOP_TOKEN,
        max_query_keys=8192,
        check_scores=check_scores_request,
    )
    queries.start()
    hello = pb.LookupHelloResponse(query_port=queries.port, query_token=NOOP_TOKEN, max_query_keys=8192)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS))
    handlers = {
        "Locate": grpc.unary_unary_rpc_method_handler(lambda request, context: b""),  # raw bytes in and out
        "Hello": grpc.unary_unary_rpc_method_handler(lambda request, context: hello.SerializeToString()),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("kvpool.v1.Lookup", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    serve_noop(int(sys.argv[1]))
