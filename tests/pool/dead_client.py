"""A client process the test kills mid-transfer (run with -P): `URL KEY LEASE_MS data|grpc`.

It leases KEY's prefix (pins it on the node), then starts a put of an 8 MiB value, on a
data-channel connection of its own or as a gRPC Put stream, sends half of it, says "held" and
hangs without sending the rest: the node is left with a pin, a half-received value and a
connection or stream that will never finish."""

from __future__ import annotations

import sys
import threading
import time

import grpc

from kvpool.cachenode import Client
from kvpool.cachenode.client.connection import ConnectOptions, NodeConnection
from kvpool.cachenode.client.datachannel import DataConnection
from kvpool.cachenode.rpc import dataproto as dp
from kvpool.cachenode.rpc.proto import kvpool_pb2 as pb
from kvpool.cachenode.rpc.proto import kvpool_pb2_grpc as pb_grpc

VALUE = 8 << 20


PARTIAL = b"never-committed" + b"-" * 17


def data_channel_put(host: str, port: int, said: threading.Event) -> None:
    hello = NodeConnection(host, port, ConnectOptions(timeout=5)).hello()
    conn = DataConnection(host, hello.data_port, hello.data_token, timeout=5)
    dp.send_buffers(conn.sock, [dp.encode_put([(PARTIAL, VALUE)]), memoryview(b"h" * (VALUE // 2))])
    said.set()
    time.sleep(3600)


def grpc_put(host: str, port: int, said: threading.Event) -> None:
    def frames():
        yield pb.PutFrame(entries=[pb.PutEntry(key=PARTIAL, size=VALUE)], data=b"h" * (1 << 20))
        yield pb.PutFrame(data=b"h" * (1 << 20))
        said.set()
        time.sleep(3600)  # the stream stays open, half sent

    pb_grpc.CacheNodeStub(grpc.insecure_channel(f"{host}:{port}")).Put(frames(), timeout=3600)


def main(url: str, key: bytes, lease_ms: int, how: str) -> None:
    with Client(url, timeout=5) as client:
        count, lease_id = client.lease_prefix([key], lease_ms)
        host, port = url.split("://")[1].rsplit(":", 1)
        said = threading.Event()
        put = data_channel_put if how == "data" else grpc_put
        threading.Thread(target=put, args=(host, int(port), said), daemon=True).start()
        said.wait(30)
        time.sleep(0.5)  # the frames just handed over reach the node
        print("held", count, lease_id, flush=True)
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].encode(), int(sys.argv[3]), sys.argv[4])
