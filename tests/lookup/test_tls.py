"""`kvpool lookup` with --tls-cert-file/--tls-key-file: TLS on gRPC and HTTP, publishers included."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import urllib.request

import pytest

from kvpool.cachenode import Unavailable
from kvpool.cachenode.client.lookup import LookupClient
from kvpool.cachenode.client.publisher import Publisher
from kvpool.cachenode.core.holders import HolderInfo
from kvpool.cachenode.rpc.lookupproto import encode_hello
from kvpool.cachenode.rpc.proto import lookup_pb2

from ..needs import needs
from .conftest import run_lookup

pytestmark = needs(shutil.which("openssl") is not None, "needs the openssl command (apt-get install openssl)")


def test_lookup_over_tls(certs):
    cert, key, ca = str(certs / "node.crt"), str(certs / "node.key"), str(certs / "ca.crt")
    with run_lookup("--tls-cert-file", cert, "--tls-key-file", key, "--rebuild-window", "0") as lookup:
        assert lookup.url.startswith("grpcs://127.0.0.1:")
        keys = [os.urandom(32) for _ in range(3)]
        info = HolderInfo("tls-agent", "agent", "memory", "grpcs://10.0.0.1:7420")
        with Publisher(lookup.url, info, lambda: keys, tls_ca_file=ca) as publisher:
            assert publisher.flush(15), publisher.stats()
            with LookupClient(lookup.url, tls_ca_file=ca) as client:
                assert client.locate(keys).prefix == 3
            with LookupClient(lookup.url, tls_ca_file=ca, transport="tcp") as client:
                assert client.locate(keys).prefix == 3  # the query channel, over TLS
                assert client.scores(keys, 16)[0][0].matched_tokens == 48
                port = client._stub.Hello(lookup_pb2.LookupHelloRequest(), timeout=10).query_port
            with socket.create_connection(("127.0.0.1", port), timeout=10) as plain_socket:
                plain_socket.sendall(encode_hello(b"x" * 32))  # no TLS: refused, nothing answered
                try:
                    answer = plain_socket.recv(100)
                except ConnectionResetError:
                    answer = b""
                assert answer[:1] in (b"", b"\x15")  # nothing, or a TLS alert record: no query reply
            with LookupClient(lookup.url, tls_ca_file=ca, transport="tcp") as client:
                assert client.locate(keys).prefix == 3  # still serving
            plain_url = lookup.url.replace("grpcs://", "grpc://")
            with LookupClient(plain_url, timeout=3) as plain, pytest.raises(Unavailable):
                plain.locate(keys)
        context = ssl.create_default_context(cafile=ca)
        url = f"https://127.0.0.1:{lookup.http_port}/healthz"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert response.status == 200
